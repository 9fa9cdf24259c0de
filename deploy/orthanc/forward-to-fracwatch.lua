-- Orthanc: forward every stable study to fracwatch (a naive rule: fracwatch must not answer its own SR
-- with a second SR). Orthanc 1.10: SendToModality with a study ID fails; use the REST API instead.
function OnStableStudy(studyId, tags, metadata)
   RestApiPost('/modalities/fracwatch/store', studyId)
end

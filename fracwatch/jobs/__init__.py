"""Jobs on Procrastinate: scoring a study version, and the cluster-wide ticks (completion, delivery, triage,
retention, stalled-job recovery), each with attempts, back-off, a time limit and a dead letter.

On PostgreSQL the queue is Procrastinate's tables in the results database (jobs deferred in the transaction that
causes them; every ``serve`` and ``worker`` process shares it). On the embedded SQLite default it is
Procrastinate's in-memory connector inside the one daemon, made durable by the study states it is rebuilt from
at start. Scoring itself runs in separate processes (``sandbox``), never in the process that runs the listener.
"""

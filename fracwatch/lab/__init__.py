"""The offline lab: data sets, training, evaluation and their plots (``fracwatch train / evaluate``)."""

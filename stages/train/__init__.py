"""train: supervised training of the pipeline's model (baseline and teacher for later stages) on
the shared loop of deploypipe.training."""

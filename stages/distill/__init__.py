"""distill: data pruning (random, EL2N, GraNd, forgetting) with knowledge distillation (Ben-Baruch et al.)."""

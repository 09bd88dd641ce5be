"""EPTQ: LFH loss weights, soft rounding, the distillation loss, the teacher, the schedule and the training loop."""

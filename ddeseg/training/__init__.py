"""Training helpers the stages share: the LR schedule, the run folder and its log, the
checkpoint format, the memory plan and precision."""

"""Synthesis of transfer inputs from teachers' BatchNorm statistics (data-free distillation)."""

"""Differential privacy: DP-SGD for teachers (Opacus), Gaussian and GNMax mechanisms for what the
server aggregates, and the accountant that composes every release into ε at δ."""

"""fedkd: federated and data-free knowledge distillation on Flower.

Clients train local teachers and share only soft labels on a transfer set; a server strategy
aggregates them and distills a global student.
"""

__version__ = "0.1.0"

"""Per-dataset defaults of ``retain benchmark`` for the options the user does not give.

For MNIST and Fashion-MNIST they are the DER paper's protocol (batch 10, one epoch, SGD 0.03);
for digits, a setting where ER reaches ~94 % in seconds; for CIFAR, a reduced ResNet-18.
Kept in a module of its own (no imports) so that the command line can show them in ``--help``
without importing torch.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    # digits: ~145 steps per update, so CLS-ER's EMA copies need a shorter horizon than the spec's
    # 0.999 (which leaves the served stable copy near its initialisation: 37 % instead of 95 %).
    "digits": {"batch_size": 10, "max_epochs": 5, "learning_rate": 0.05, "memory_size": 200,
               "methods": {
                   "cls": {"stable_model_update_weight": 0.99, "plastic_model_update_weight": 0.9},
                   "super": {"der_alpha": 0.3, "der_beta": 0.5, "cls_stable_model_update_weight": 0.99,
                             "cls_plastic_model_update_weight": 0.9, "pod_alpha": 0.1},
               }},
    "mnist": {"batch_size": 10, "max_epochs": 1, "learning_rate": 0.03, "memory_size": 500},
    "fashion-mnist": {"batch_size": 10, "max_epochs": 1, "learning_rate": 0.03, "memory_size": 500},
    "cifar10": {"batch_size": 32, "max_epochs": 50, "learning_rate": 0.03, "memory_size": 500, "model": "resnet18"},
    "cifar100": {"batch_size": 32, "max_epochs": 50, "learning_rate": 0.03, "memory_size": 2000,
                 "model": "resnet18"},
}
TRAINING_RECIPE_KEYS = ("batch_size", "max_epochs")

"""Stage 3, ``selectmoe finetune``: LoRA-finetune the target model on the selection (Ray Train).

``driver.finetune(cfg)`` tokenises the rows and runs ``worker.train_target_per_worker`` through the
shared loop (``selectmoe.training``); the output folder is a PEFT adapter with its tokenizer.
"""

from selectmoe.lazy import lazy_attribute

__all__ = ["finetune"]
__getattr__ = lazy_attribute(__name__, "finetune", "selectmoe.finetune.driver")

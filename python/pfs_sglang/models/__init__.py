"""Models the project makes itself: the offline tokenizer and the embedded demo models."""

from pfs_sglang.models.demo import (
    DEMO_DECODE_MODULES,
    DemoModels,
    TinyLlamaShape,
    load_demo_models,
    write_demo_lora_adapters,
    write_demo_models,
)

__all__ = ["DEMO_DECODE_MODULES", "DemoModels", "TinyLlamaShape", "load_demo_models", "write_demo_lora_adapters",
           "write_demo_models"]

from alignshield.models.load import load_model, load_tokenizer, resolve_device

__all__ = ["load_model", "load_tokenizer", "resolve_device"]

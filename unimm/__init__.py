"""UniMM: a training stack for unified multimodal LLMs (understanding and generation over discrete visual codes)."""

__version__ = "0.1.0"

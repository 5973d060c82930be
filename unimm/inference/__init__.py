"""Running trained UniMM models: loading the stack (`stack`), image question answering (`chat`), text-to-image
(`t2i`), and their program configs (`args`). Tokenizer evaluation lives in `tokenizer_eval`."""

"""UniMM Studio: a web page over a trained stack, to generate images, chat about an image, look at what the
visual tokenizer keeps, and plot a run's training logs. Needs the `[demo]` extra (Gradio).

    unimm-demo --run_dir runs/quickstart            # the newest model in the folder, its recorded visual tokenizer
    unimm-demo --model_path runs/finetune --visual_tokenizer_path runs/quickstart/tokenizer/model --port 7860

The page is served on http://HOST:PORT (127.0.0.1:7860 by default). `--run_dir` is also where the Runs tab lists
training output folders; without it, the model folder's parent. The chat format options are the finetuning ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from unimm.cli.errors import ConfigError
from unimm.cli.program import ConfigProgram
from unimm.data.tasks import ChatFormatConfig
from unimm.utils.config import config_field


@dataclass
class DemoArguments:
    model_path: str | None = config_field(None, "A UniMM model folder or LoRA checkpoint (default: the newest model "
                                          "in run_dir).")
    visual_tokenizer_path: str | None = config_field(None, "The model's visual tokenizer (default: the folder its "
                                                     "config records).")
    run_dir: str | None = config_field(None, "A run folder (e.g. the quickstart's output): where the model is found "
                                       "when model_path is not given, and whose training runs the Runs tab lists.")
    device: str = config_field("auto", "cuda, cpu, or auto.")
    dtype: str = config_field("auto", "Weight dtype: auto, float32, bfloat16, float16.")
    allow_visual_tokenizer_mismatch: bool = config_field(False, "Use a visual tokenizer other than the recorded one.")
    host: str = config_field("127.0.0.1", "Address to serve on (0.0.0.0: every interface).")
    port: int = config_field(7860, "Port to serve on.")
    max_images: int = config_field(16, "Most images one Generate click may ask for.")

    def __post_init__(self) -> None:
        if not self.model_path and not self.run_dir:
            raise ValueError("pass --run_dir (a run folder such as runs/quickstart) or --model_path")
        if not 0 < self.port < 65536 or self.max_images < 1:
            raise ValueError(f"port must be in 1..65535 and max_images >= 1, got {self.port}, {self.max_images}")


def demo(args: DemoArguments, chat_format: ChatFormatConfig, serve: bool = True):
    """Load the stack, build the page and serve it (blocks until interrupted); `serve=False` returns the page."""
    import importlib.util

    from unimm.utils.imports import require
    from unimm.utils.logging import setup_logging

    setup_logging()
    try:
        require(importlib.util.find_spec("gradio") is not None, "gradio", "demo")
    except ImportError as err:
        raise ConfigError(str(err)) from None
    from unimm.demo.app import build_app, launch
    from unimm.demo.backend import DemoBackend

    backend = DemoBackend.load(args.model_path, args.visual_tokenizer_path, args.run_dir, chat_format,
                               device=args.device, dtype=args.dtype,
                               allow_visual_tokenizer_mismatch=args.allow_visual_tokenizer_mismatch,
                               max_images=args.max_images)
    app = build_app(backend)
    if serve:
        print(f"UniMM Studio on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
        launch(app, args.host, args.port)
    return app


CONFIG_TYPES = (DemoArguments, ChatFormatConfig)
PROGRAM = ConfigProgram("unimm-demo", CONFIG_TYPES, demo)
make_parser, parse_args, main = PROGRAM.make_parser, PROGRAM.parse_args, PROGRAM.main

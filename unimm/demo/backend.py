"""What the demo page does, without the page: find a trained stack in a run folder, generate images, answer
questions over several turns, show what a visual tokenizer keeps, and read a run's training logs.

Generation and chat go through the inference layer (`unimm.inference.t2i`, `unimm.inference.chat`,
`unimm.inference.stack`), so the page validates and samples exactly as `unimm-generate-t2i` and `unimm-chat` do;
the tokenizer view runs the metric pass of `unimm-eval-tokenizer` (`unimm.tokenizer.metrics.evaluate_tokenizer`) on
one image. `unimm.demo.app` puts these on a Gradio page.
"""

from __future__ import annotations

import colorsys
import json
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unimm.utils.errors import UserError


class DemoInputError(UserError, ValueError):
    """A value typed or uploaded on the page that cannot be used; shown as a message on the page."""


# ---------------------------------------------------------------------------------------------- finding the stack


def _model_type(folder: Path) -> str | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, OSError):
        return None


def is_model_folder(folder: Path) -> bool:
    """A UniMM model folder, or a LoRA checkpoint (`load_for_inference` merges its adapter)."""
    from unimm.llm import UniMMConfig

    return (folder / "adapter_config.json").is_file() or _model_type(folder) == UniMMConfig.model_type


def find_model(run_dir: Path) -> Path:
    """The model of a run folder: the folder itself when it holds one, else the most recently written model among
    its subfolders (the quickstart's `finetune`, written after `pretrain`)."""
    if not run_dir.is_dir():
        raise DemoInputError(f"run_dir={run_dir}: not a folder")
    if is_model_folder(run_dir):
        return run_dir
    models = [sub for sub in run_dir.iterdir() if sub.is_dir() and is_model_folder(sub)]
    if not models:
        raise DemoInputError(f"run_dir={run_dir}: holds no UniMM model (no subfolder with a UniMM config.json or a "
                             "LoRA adapter); pass --model_path")
    return max(models, key=lambda sub: ((sub / "config.json").stat().st_mtime if (sub / "config.json").exists()
                                        else (sub / "adapter_config.json").stat().st_mtime))


def recorded_visual_tokenizer(model_path: Path) -> Path:
    """The visual tokenizer folder a model records in its config (`visual_tokenizer_identity.path`); a LoRA
    checkpoint's is its base model's."""
    from unimm.train.llm.lora import base_model_path, is_lora_checkpoint

    config_path = (base_model_path(model_path) if is_lora_checkpoint(model_path) else model_path) / "config.json"
    identity = json.loads(config_path.read_text()).get("visual_tokenizer_identity") or {}
    path = identity.get("path")
    if not path or not Path(path).is_dir():
        raise DemoInputError(f"model_path={model_path}: its config records no visual tokenizer folder that exists "
                             f"here ({path!r}); pass --visual_tokenizer_path")
    return Path(path)


# ---------------------------------------------------------------------------------------------- generation


@dataclass
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    cfg_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    num_images: int = 4

    def settings(self, index: int) -> str:
        """The caption of image `index`: everything needed to sample it again with `unimm-generate-t2i`."""
        negative = f", negative '{self.negative_prompt}'" if self.negative_prompt else ""
        return (f"'{self.prompt}'{negative}, guidance {self.cfg_scale:g}, temperature {self.temperature:g}, "
                f"top-k {self.top_k or 'off'}, top-p {self.top_p if self.top_p < 1 else 'off'}, "
                f"seed {self.seed + index}")


@dataclass
class Chat:
    """One conversation about one image (or none): the turns so far as (question, answer)."""

    image: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)


class DemoBackend:
    """A loaded stack (model, text tokenizer, visual tokenizer) and the folder whose runs the page lists."""

    def __init__(self, stack: Any, runs_root: Path | None, chat_format: Any, max_images: int = 16,
                 model_path: str | None = None):
        self.stack = stack
        self.model_path = model_path or getattr(stack.model.config, "_name_or_path", "")
        self.runs_root = runs_root
        self.chat_format = chat_format
        self.max_images = max_images
        self._factory = None

    @classmethod
    def load(cls, model_path: str | None, visual_tokenizer_path: str | None, run_dir: str | None, chat_format: Any,
             device: str = "auto", dtype: str = "auto", allow_visual_tokenizer_mismatch: bool = False,
             max_images: int = 16) -> DemoBackend:
        from unimm.inference.args import InferenceArguments
        from unimm.inference.stack import load_inference_stack

        runs_root = Path(run_dir) if run_dir else None
        if not model_path:
            if runs_root is None:
                raise DemoInputError("nothing to show: pass --model_path (and --visual_tokenizer_path) or --run_dir")
            model_path = str(find_model(runs_root))
        if not visual_tokenizer_path:
            visual_tokenizer_path = str(recorded_visual_tokenizer(Path(model_path)))
        infer_args = InferenceArguments(model_path=model_path, visual_tokenizer_path=visual_tokenizer_path,
                                        device=device, dtype=dtype,
                                        allow_visual_tokenizer_mismatch=allow_visual_tokenizer_mismatch)
        stack = load_inference_stack(infer_args)
        return cls(stack, runs_root or Path(model_path).parent, chat_format, max_images, model_path)

    # ---- Generate

    def generate(self, request: GenerateRequest,
                 progress: Callable[[int, int], None] | None = None) -> list[tuple[Any, str]]:
        """`request.num_images` images of one prompt as (PIL image, settings caption); image i is sampled with seed
        `seed + i` (one image per batch of `generate_pil_images`). `progress(done, total)` counts the decoded
        positions of all the images."""
        from unimm.inference.args import GenerateArguments
        from unimm.inference.t2i import generate_pil_images

        if not request.prompt.strip():
            raise DemoInputError("prompt: type what the image should show")
        if not 1 <= request.num_images <= self.max_images:
            raise DemoInputError(f"number of images must be between 1 and {self.max_images}, got "
                                 f"{request.num_images}")
        if request.top_k < 0 or not 0.0 < request.top_p <= 1.0:
            raise DemoInputError(f"top-k must be >= 0 (0 = off) and top-p in (0, 1] (1 = off), got top-k "
                                 f"{request.top_k}, top-p {request.top_p}")
        gen_args = GenerateArguments(
            prompts=[request.prompt] * request.num_images, cfg_scale=request.cfg_scale,
            negative_prompt=request.negative_prompt or None, temperature=request.temperature,
            top_k=request.top_k or None, top_p=request.top_p if request.top_p < 1.0 else None, batch_size=1)
        images = generate_pil_images(self.stack, gen_args.all_prompts(), gen_args, seed=request.seed,
                                     progress=progress)
        return [(image, request.settings(i)) for i, image in enumerate(images)]

    # ---- Chat

    def factory(self):
        from unimm.inference.chat import chat_factory

        if self._factory is None:
            self._factory = chat_factory(self.stack, self.chat_format)
        return self._factory

    def conversation_prompt(self, chat: Chat, question: str):
        """The prompt of `question` after `chat.turns` (`chat_prompt` with the turns as history)."""
        from unimm.inference.chat import chat_prompt

        return chat_prompt(self.factory(), self.stack, chat.image or None, question,
                           f"chat turn {len(chat.turns) + 1}", history=chat.turns)

    @staticmethod
    def check_question(chat: Chat, question: str, max_new_tokens: int) -> None:
        """The errors `ask` reports before generating: an empty question, no answer length, an unreadable image."""
        if not question.strip():
            raise DemoInputError("question: type a question")
        if max_new_tokens < 1:
            raise DemoInputError(f"answer length must be at least 1 token, got {max_new_tokens}")
        if chat.image is not None:
            from unimm.data.images import load_image

            load_image(chat.image, "chat image")  # an unreadable upload: ImageLoadError naming it

    def ask(self, chat: Chat, question: str, max_new_tokens: int = 64, do_sample: bool = False,
            temperature: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to `question` in `chat`; the turn is appended to `chat`. `on_text` receives the answer's
        pieces as they are generated (`unimm.inference.chat.answer`)."""
        from unimm.inference.chat import answer

        self.check_question(chat, question, max_new_tokens)
        text = answer(self.stack, self.conversation_prompt(chat, question), max_new_tokens, do_sample, temperature,
                      None, seed, on_text=on_text)
        chat.turns.append((question, text))
        return text

    def ask_streaming(self, chat: Chat, question: str, max_new_tokens: int = 64, do_sample: bool = False,
                      temperature: float = 1.0, seed: int = 0) -> Iterator[str]:
        """`ask` on a worker thread, yielding the answer so far: "" once the question is accepted, then the text each
        time a piece arrives, and the whole answer last (once the turn is in `chat`); its errors are raised here."""
        self.check_question(chat, question, max_new_tokens)
        yield ""
        pieces: queue.Queue = queue.Queue()
        done = object()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["answer"] = self.ask(chat, question, max_new_tokens, do_sample, temperature, seed,
                                             on_text=pieces.put)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                outcome["error"] = err
            finally:
                pieces.put(done)

        worker = threading.Thread(target=work, name="unimm-demo-answer", daemon=True)
        worker.start()
        text = ""
        while (piece := pieces.get()) is not done:
            text += piece
            yield text
        worker.join()
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["answer"]

    # ---- Tokenizer

    def tokenize(self, image_path: str) -> TokenizerView:
        """Reconstruction, PSNR/SSIM and the codes of one uploaded image, through `evaluate_tokenizer`'s pass."""
        from unimm.data.images import load_image
        from unimm.tokenizer.metrics import evaluate_tokenizer

        visual = self.stack.visual_tokenizer
        if not hasattr(visual, "codebook_spec"):
            raise DemoInputError("this model reads images with a vision tower, which has no codes to show")
        image = load_image(image_path, Path(image_path).name)
        pixels = visual.preprocess(image)
        reconstructions: list = []

        def keep(ids, inputs01, recon01):
            reconstructions.extend(recon01)

        with torch.no_grad():
            metrics = evaluate_tokenizer(visual, [{"pixel_values": pixels, "ids": ["upload"]}], self.stack.device,
                                         image_writer=keep)
            codes = {g: c[0].cpu() for g, c in visual.encode(pixels.to(self.stack.device)).items()}
        from unimm.train.tokenizer.data import image_from_tensor

        return TokenizerView(input=image.resize(visual_size(visual)), reconstruction=image_from_tensor(
            reconstructions[0]), psnr=metrics["psnr"], ssim=metrics["ssim"], codes=codes,
            num_codes={g: spec.num_codes for g, spec in visual.codebook_spec.items()})


def visual_size(visual: Any) -> tuple[int, int]:
    size = visual.config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


@dataclass
class TokenizerView:
    input: Any
    reconstruction: Any
    psnr: float
    ssim: float
    codes: dict[str, torch.Tensor]  # group -> [N, D]
    num_codes: dict[str, int]

    @property
    def depth(self) -> int:
        return max(c.shape[1] for c in self.codes.values())

    def summary(self) -> str:
        """PSNR / SSIM and, per codebook, how many distinct codes the image used at each depth."""
        lines = [f"**PSNR** {self.psnr:.2f} dB · **SSIM** {self.ssim:.4f}", ""]
        for group, codes in self.codes.items():
            used = ", ".join(f"depth {d}: {int(codes[:, d].unique().numel())}" for d in range(codes.shape[1]))
            lines.append(f"- `{group}` ({self.num_codes[group]} codes, {codes.shape[0]} positions): distinct codes "
                         f"{used}")
        return "\n".join(lines)

    def code_map(self, group: str, depth: int, cell: int = 24):
        """The codes of `group` at `depth` as a square map, one colour per code (the same code, the same colour)."""
        from PIL import Image, ImageDraw

        codes = self.codes[group]
        depth = min(depth, codes.shape[1] - 1)
        side = math.isqrt(codes.shape[0])
        grid = codes[:, depth].reshape(side, side) if side * side == codes.shape[0] else codes[:, depth][None]
        rows, columns = grid.shape
        image = Image.new("RGB", (columns * cell, rows * cell))
        draw = ImageDraw.Draw(image)
        for r in range(rows):
            for c in range(columns):
                draw.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1],
                               fill=code_colour(int(grid[r, c])))
        return image


def code_colour(code: int) -> tuple[int, int, int]:
    hue = (code * 0.618033988749895) % 1.0  # golden-ratio steps: neighbouring codes get distant hues
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95 - 0.3 * ((code // 7) % 2))
    return int(r * 255), int(g * 255), int(b * 255)


# ---------------------------------------------------------------------------------------------- runs

# What the Runs tab plots, in the trainers' log names: the LLM trainer's `trainer_state.json` log_history
# (`unimm.train.llm.trainer`) and the visual-tokenizer trainer's `train_log.jsonl` (`unimm.train.tokenizer.loop`).
LOSS_PREFIXES = ("loss", "text_loss", "visual_loss/", "loss/")
OTHER_METRICS = {"learning rate": ("learning_rate", "lr"), "tokens/s": ("tokens_per_second",),
                 "grad norm": ("grad_norm",)}


@dataclass
class RunLog:
    folder: Path
    records: list[dict]  # one per logged step, each with "step"
    checkpoints: list[Path]

    def loss_names(self) -> list[str]:
        names = {k for r in self.records for k, v in r.items() if isinstance(v, (int, float)) and (
            k in ("loss", "text_loss") or k.startswith(("visual_loss/", "loss/")))}
        return sorted(names, key=lambda n: (n != "loss", n))

    def series(self, names: list[str]):
        """A long table (step, value, series) of `names` for a line plot."""
        import pandas as pd

        rows = [(r["step"], float(r[n]), n) for r in self.records for n in names
                if isinstance(r.get(n), (int, float)) and math.isfinite(r[n])]
        return pd.DataFrame(rows, columns=["step", "value", "series"])

    def metric(self, label: str):
        for name in OTHER_METRICS[label]:
            if any(isinstance(r.get(name), (int, float)) for r in self.records):
                return self.series([name])
        return self.series([])

    def checkpoint_table(self) -> list[list]:
        from unimm.train.checkpoint import is_complete

        return [[path.name, "complete" if is_complete(path) else "incomplete (no COMPLETE marker)"]
                for path in self.checkpoints]


def list_runs(root: Path | None) -> list[Path]:
    """Training output folders at or under `root` (two levels), those holding a trainer log; checkpoints are
    part of their run."""
    if root is None or not root.is_dir():
        return []

    def folders(parent: Path) -> list[Path]:
        return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("checkpoint-"))

    candidates = [root, *folders(root)]
    candidates += [q for p in candidates[1:] for q in folders(p)]
    return [p for p in candidates if _log_file(p) is not None]


def _log_file(folder: Path) -> Path | None:
    from unimm.train.checkpoint import list_checkpoints

    for name in ("trainer_state.json", "train_log.jsonl"):
        if (folder / name).is_file():
            return folder / name
    checkpoints = list_checkpoints(folder) if folder.is_dir() else []
    if checkpoints and (checkpoints[-1] / "trainer_state.json").is_file():
        return checkpoints[-1] / "trainer_state.json"
    return None


def read_run(folder: str | Path) -> RunLog:
    """The logged steps and the checkpoints of a training output folder."""
    from unimm.train.checkpoint import list_checkpoints
    from unimm.utils.errors import InputFileError, invalid_json

    folder = Path(folder)
    log = _log_file(folder) if folder.is_dir() else None
    if log is None:
        raise DemoInputError(f"{folder}: no training log there (trainer_state.json of pretrain/finetune, "
                             "train_log.jsonl of the tokenizer trainer)")
    records = []
    if log.name == "trainer_state.json":
        try:
            history = json.loads(log.read_text()).get("log_history", [])
        except json.JSONDecodeError as err:
            raise invalid_json(log, err) from None
        records = [r for r in history if "step" in r and any(k in r for k in ("loss", "learning_rate"))]
    else:
        for number, line in enumerate(log.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise InputFileError(f"{log}:{number}:{err.colno}: invalid JSON: {err.msg}") from None
    if not records:
        raise DemoInputError(f"{log}: no logged steps yet")
    return RunLog(folder, records, list_checkpoints(folder))

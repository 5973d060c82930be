"""UniMM Studio: the Gradio page over a `DemoBackend` (`unimm.demo.backend`), with four tabs.

- Generate: prompt, negative prompt, guidance, temperature, top-k/top-p, seed, number of images; a progress bar
  counting the decoded positions of all the images; the images as a gallery captioned with their settings, each
  downloadable.
- Chat: an uploaded (or a just generated) image and questions over several turns; the answer streams in as its
  tokens are generated (a Gradio generator handler over `DemoBackend.ask_streaming`).
- Tokenizer: an uploaded image beside its reconstruction, PSNR/SSIM, and a map of the codes each position used,
  per codebook, with buttons stepping through depth.
- Runs: a run folder's losses, learning rate, tokens/s and grad norm against steps, and its checkpoints.

Every handler reports a user error (`unimm.utils.errors.is_user_error`, or a ValueError from validation) as a message
in its tab's status line; any other exception is logged with its traceback on the server and shown as one line.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from unimm.demo.backend import OTHER_METRICS, Chat, DemoBackend, GenerateRequest, list_runs, read_run

logger = logging.getLogger(__name__)

TITLE = "UniMM Studio"
IMAGE_HEIGHT = 256
# small images (the toy tokenizers' 16-32 px) are scaled up to their box on the page, their pixels kept sharp
CSS = """img { image-rendering: pixelated; }
.unimm-pixels img { width: 100% !important; height: 100% !important; object-fit: contain; }"""
PIXELS = {"height": IMAGE_HEIGHT, "elem_classes": ["unimm-pixels"]}
EMPTY_ANSWER = "(no text: the model ended its answer at once)"
PROGRESS = gr.Progress()  # a handler's default: Gradio passes the handler its progress bar


def describe_error(err: BaseException) -> str:
    from unimm.utils.errors import describe_user_error, is_user_error

    if is_user_error(err) or isinstance(err, ValueError):
        return f"⚠️ {describe_user_error(err)}"
    logger.exception("demo handler failed")
    return f"⚠️ internal error ({type(err).__name__}: {err}); the server log has the traceback"


def guarded(handler: Callable[..., tuple], outputs: int) -> Callable[..., tuple]:
    """`handler` returning its outputs and "" as status, or, when it raises, unchanged outputs and the message."""
    @functools.wraps(handler)  # Gradio reads the handler's signature (its gr.Progress argument) through this
    def run(*args):
        try:
            return (*handler(*args), "")
        except Exception as err:  # noqa: BLE001 - every failure becomes a message on the page
            return (*[gr.skip()] * outputs, describe_error(err))

    return run


def guarded_stream(handler: Callable[..., Iterator[tuple]], outputs: int) -> Callable[..., Iterator[tuple]]:
    """`guarded` for a generator handler: each of its updates with "" as status, or, when it raises, unchanged outputs
    and the message."""
    @functools.wraps(handler)
    def run(*args):
        try:
            for values in handler(*args):
                yield (*values, "")
        except Exception as err:  # noqa: BLE001 - every failure becomes a message on the page
            yield (*[gr.skip()] * outputs, describe_error(err))

    return run


def build_app(backend: DemoBackend):
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"# {TITLE}\n{_stack_line(backend)}")
        with gr.Tab("Generate", id="generate"):
            gallery = _generate_tab(backend)
        with gr.Tab("Chat", id="chat"):
            chat_image = _chat_tab(backend)
        gallery.select(_selected_image, None, chat_image)  # a generated image picked in the gallery, to ask about
        with gr.Tab("Tokenizer", id="tokenizer"):
            _tokenizer_tab(backend)
        with gr.Tab("Runs", id="runs"):
            _runs_tab(backend)
    return app


def _selected_image(evt: gr.SelectData):
    """The file of the gallery image just selected (Gradio passes `gr.SelectData` to an argument so annotated)."""
    value = evt.value or {}
    image = value.get("image", value) if isinstance(value, dict) else value
    return image.get("path") if isinstance(image, dict) else image


def _stack_line(backend: DemoBackend) -> str:
    stack = backend.stack
    model = backend.model_path or "model"
    visual = getattr(stack.visual_tokenizer, "name_or_path", "") or type(stack.visual_tokenizer).__name__
    return f"Model `{model}` · visual tokenizer `{visual}` · {stack.device}"


def _status(elem_id: str):
    return gr.Markdown("", elem_id=elem_id)


def _generate_tab(backend: DemoBackend):
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", placeholder="a red circle at the top left", elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt (needs guidance > 0)", elem_id="gen-negative")
            with gr.Row():
                cfg = gr.Number(value=3.0, label="Guidance scale (0 = off)", elem_id="gen-cfg")
                temperature = gr.Number(value=1.0, label="Temperature (0 = greedy)", elem_id="gen-temperature")
                top_k = gr.Number(value=0, precision=0, label="Top-k (0 = off)", elem_id="gen-top-k")
                top_p = gr.Number(value=1.0, label="Top-p (1 = off)", elem_id="gen-top-p")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="gen-seed")
                count = gr.Number(value=4, precision=0, label=f"Images (1-{backend.max_images})",
                                  elem_id="gen-count")
            button = gr.Button("Generate", variant="primary", elem_id="gen-button")
            status = _status("gen-status")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", columns=4, object_fit="contain", elem_id="gen-gallery",
                                 format="png")

    def generate(prompt, negative, cfg, temperature, top_k, top_p, seed, count, progress=PROGRESS):
        request = GenerateRequest(prompt=prompt or "", negative_prompt=(negative or "").strip(),
                                  cfg_scale=float(cfg or 0), temperature=float(temperature or 0),
                                  top_k=int(top_k or 0), top_p=float(1.0 if top_p is None else top_p),
                                  seed=int(seed or 0), num_images=int(count or 0))

        def on_position(done: int, total: int) -> None:
            progress((done, total), desc="decoding positions", unit="positions")

        return (backend.generate(request, progress=on_position),)

    button.click(guarded(generate, 1), [prompt, negative, cfg, temperature, top_k, top_p, seed, count],
                 [gallery, status])
    prompt.submit(guarded(generate, 1), [prompt, negative, cfg, temperature, top_k, top_p, seed, count],
                  [gallery, status])
    return gallery


def _chat_tab(backend: DemoBackend):
    chat_state = gr.State(None)
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(label="Image (upload, or select a generated one)", type="filepath", elem_id="chat-image",
                             elem_classes=["unimm-pixels"], sources=["upload", "clipboard"], height=IMAGE_HEIGHT)
            max_tokens = gr.Number(value=32, precision=0, label="Longest answer (tokens)", elem_id="chat-max-tokens")
            sample = gr.Checkbox(value=False, label="Sample (temperature 1) instead of greedy", elem_id="chat-sample")
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Conversation", elem_id="chat-log", height=360)
            question = gr.Textbox(label="Question", placeholder="what colour is the shape?", elem_id="chat-question")
            with gr.Row():
                ask = gr.Button("Ask", variant="primary", elem_id="chat-ask")
                clear = gr.Button("New conversation", elem_id="chat-clear")
            status = _status("chat-status")

    def on_ask(image_path, question_text, max_new_tokens, do_sample, chat):
        if chat is None or chat.image != image_path:
            chat = Chat(image=image_path)  # a new image starts a new conversation
        earlier = []
        for asked, answered in chat.turns:
            earlier += [{"role": "user", "content": asked},
                        {"role": "assistant", "content": answered or EMPTY_ANSWER}]
        asking = [{"role": "user", "content": question_text or ""}]
        text = ""
        for text in backend.ask_streaming(chat, question_text or "", int(max_new_tokens or 0), bool(do_sample)):
            # the question once accepted, then the answer so far, growing on the page
            yield earlier + asking + ([{"role": "assistant", "content": text}] if text else []), chat, ""
        yield earlier + asking + [{"role": "assistant", "content": text or EMPTY_ANSWER}], chat, ""

    ask.click(guarded_stream(on_ask, 3), [image, question, max_tokens, sample, chat_state],
              [chatbot, chat_state, question, status])
    question.submit(guarded_stream(on_ask, 3), [image, question, max_tokens, sample, chat_state],
                    [chatbot, chat_state, question, status])
    clear.click(lambda: ([], None, ""), None, [chatbot, chat_state, status])
    return image


def _tokenizer_tab(backend: DemoBackend) -> None:
    view_state = gr.State(None)
    spec = getattr(backend.stack.visual_tokenizer, "codebook_spec", {}) or {}
    groups = list(spec)
    depth_steps = max([group.depth for group in spec.values()], default=1)
    with gr.Row():
        upload = gr.Image(label="Image", type="filepath", elem_id="tok-upload", sources=["upload", "clipboard"],
                          **PIXELS)
        original = gr.Image(label="Input (tokenizer size)", elem_id="tok-input", interactive=False, format="png",
                            **PIXELS)
        reconstruction = gr.Image(label="Reconstruction", elem_id="tok-recon", interactive=False, format="png",
                                  **PIXELS)
    metrics = gr.Markdown("", elem_id="tok-metrics")
    status = _status("tok-status")
    depth = gr.Radio(choices=list(range(depth_steps)), value=0, label="Depth (code level shown in the maps)",
                     elem_id="tok-depth", interactive=depth_steps > 1)
    with gr.Row():
        maps = [gr.Image(label=f"Codes: {group} (one colour per code)", elem_id=f"tok-map-{group}", interactive=False,
                         format="png", **PIXELS) for group in groups]

    def on_upload(path):
        if path is None:
            return (None, None, "", 0, *[None] * len(groups), None)
        view = backend.tokenize(path)
        return (view.input, view.reconstruction, view.summary(), 0,
                *[view.code_map(group, 0) for group in groups], view)

    def on_depth(level, view):
        if view is None or level is None:
            return tuple(gr.skip() for _ in groups)
        return tuple(view.code_map(group, int(level)) for group in groups)

    upload.change(guarded(on_upload, 5 + len(groups)), [upload],
                  [original, reconstruction, metrics, depth, *maps, view_state, status])
    depth.change(guarded(on_depth, len(groups)), [depth, view_state], [*maps, status])


def _runs_tab(backend: DemoBackend) -> None:
    runs = [str(path) for path in list_runs(backend.runs_root)]
    with gr.Row():
        folder = gr.Dropdown(choices=runs, value=None, label="Run folder", allow_custom_value=True,
                             elem_id="runs-folder", scale=4)
        show = gr.Button("Show", variant="primary", elem_id="runs-show", scale=1)
    status = _status("runs-status")
    with gr.Row():
        losses = gr.LinePlot(x="step", y="value", color="series", title="Losses", elem_id="runs-losses")
        lr = gr.LinePlot(x="step", y="value", title="Learning rate", elem_id="runs-lr")
    with gr.Row():
        speed = gr.LinePlot(x="step", y="value", title="Tokens/s", elem_id="runs-speed")
        grad = gr.LinePlot(x="step", y="value", title="Grad norm", elem_id="runs-grad")
    checkpoints = gr.Dataframe(headers=["checkpoint", "state"], label="Checkpoints", elem_id="runs-checkpoints",
                               interactive=False)

    def on_show(path):
        if not path:
            raise ValueError("run folder: pick or type a training output folder")
        run = read_run(Path(path))
        return (run.series(run.loss_names()), *[run.metric(label) for label in OTHER_METRICS],
                run.checkpoint_table() or [["(none)", ""]])

    show.click(guarded(on_show, 5), [folder], [losses, lr, speed, grad, checkpoints, status])


def launch(app: Any, host: str, port: int, share: bool = False) -> None:
    app.queue().launch(server_name=host, server_port=port, share=share, show_error=False, inbrowser=False, css=CSS)

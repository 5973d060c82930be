"""What the demo page does, without the browser (unimm/demo/backend.py): the stack found in a run folder, images
equal to the inference layer's for the same settings, a multi-turn prompt that starts as `chat_prompt`'s, the
tokenizer view, and the run logs."""

from __future__ import annotations

import json

import pytest
import torch

from unimm.data.tasks import ChatFormatConfig
from unimm.demo.backend import Chat, DemoBackend, DemoInputError, GenerateRequest, list_runs, read_run


@pytest.fixture(scope="module")
def backend(demo_runs):
    return DemoBackend.load(None, None, str(demo_runs), ChatFormatConfig(), device="cpu")


def test_run_folder_gives_the_newest_model_and_its_recorded_visual_tokenizer(backend, demo_runs, toy):
    assert backend.stack.model.config._name_or_path == str(demo_runs / "pretrain")
    assert backend.stack.visual_tokenizer.name_or_path == str(toy["tokenizer"])
    with pytest.raises(DemoInputError, match=r"run_dir=.*holds no UniMM model .* pass --model_path"):
        DemoBackend.load(None, None, str(toy["images"]), ChatFormatConfig(), device="cpu")


def test_generated_images_are_the_inference_layers_for_the_same_seeds(backend):
    from unimm.inference.args import GenerateArguments
    from unimm.inference.t2i import generate_pil_images

    shown = backend.generate(GenerateRequest("a red image", cfg_scale=2.0, temperature=1.0, top_k=8, seed=5,
                                             num_images=3))
    assert len(shown) == 3 and all(image.size == (16, 16) for image, _ in shown)
    assert shown[2][1] == "'a red image', guidance 2, temperature 1, top-k 8, top-p off, seed 7"
    for index, (image, _) in enumerate(shown):  # image i: one batch of generate_pil_images seeded 5 + i
        (want,) = generate_pil_images(backend.stack, ["a red image"], GenerateArguments(
            prompts=["a red image"], cfg_scale=2.0, top_k=8, batch_size=1), seed=5 + index)
        assert list(image.getdata()) == list(want.getdata())
    with pytest.raises(ValueError, match="negative_prompt is guidance's second branch"):
        backend.generate(GenerateRequest("a red image", negative_prompt="blue", cfg_scale=0))
    with pytest.raises(DemoInputError, match="number of images must be between 1 and 16, got 17"):
        backend.generate(GenerateRequest("a red image", num_images=17))


def test_generate_reports_progress_per_decoded_position(backend):
    """The Generate tab's bar: one report per decoded position, counted over all the images, ending at the total;
    the images are those drawn without it."""
    calls: list[tuple[int, int]] = []
    request = GenerateRequest("a red image", cfg_scale=2.0, top_k=8, seed=5, num_images=2)
    shown = backend.generate(request, progress=lambda done, total: calls.append((done, total)))
    positions = backend.stack.visual_tokenizer.num_positions  # 16 for the toy tokenizer
    assert calls == [(k, 2 * positions) for k in range(1, 2 * positions + 1)]
    plain = backend.generate(request)
    assert [list(image.getdata()) for image, _ in shown] == [list(image.getdata()) for image, _ in plain]


def test_streamed_answer_grows_into_the_answer_of_ask(backend, toy):
    """`ask_streaming` (the Chat tab's generator): "" once the question is accepted, then the answer so far, each
    update extending the last, ending with what `ask` answers for the same seed; the turn is recorded once."""
    image = str(toy["images"] / "red_0.png")
    for sampling in (dict(), dict(do_sample=True, seed=2)):
        want = backend.ask(Chat(image=image), "what colour is it?", max_new_tokens=8, **sampling)
        chat = Chat(image=image)
        updates = list(backend.ask_streaming(chat, "what colour is it?", max_new_tokens=8, **sampling))
        assert updates[0] == "" and updates[-1] == want and chat.turns == [("what colour is it?", want)]
        assert all(later.startswith(earlier) for earlier, later in zip(updates, updates[1:])), updates
        if sampling:
            assert len(set(updates)) > 2, updates  # it grew over several updates, not once at the end
    with pytest.raises(DemoInputError, match="question: type a question"):
        next(backend.ask_streaming(chat, "  "))
    assert len(chat.turns) == 1


def test_first_turn_is_chat_prompt_and_later_turns_carry_the_history(backend, toy):
    from unimm.inference.chat import chat_prompt

    image = str(toy["images"] / "red_0.png")
    chat = Chat(image=image)
    first = backend.conversation_prompt(chat, "what colour is it?")
    single = chat_prompt(backend.factory(), backend.stack, image, "what colour is it?", "question0")
    assert torch.equal(first.input_ids, single.input_ids)
    assert all(torch.equal(first.visual_codes[g], single.visual_codes[g]) for g in single.visual_codes)
    answer = backend.ask(chat, "what colour is it?", max_new_tokens=4)
    assert chat.turns == [("what colour is it?", answer)]
    second = backend.conversation_prompt(chat, "and its shape?")
    text = backend.stack.text_tokenizer.decode(second.input_ids)
    assert text.count("what colour is it?") == 1 and "and its shape?" in text
    assert len(second) > len(first)  # the first turn (image, question, answer) precedes the new question
    with pytest.raises(DemoInputError, match="question: type a question"):
        backend.ask(chat, "  ")


def test_tokenizer_view_reconstructs_and_maps_the_codes(backend, toy, tmp_path):
    from unimm.data.images import ImageLoadError

    view = backend.tokenize(str(toy["images"] / "blue_0.png"))
    assert view.reconstruction.size == view.input.size == (16, 16)
    assert view.psnr > 0 and -1 <= view.ssim <= 1
    assert set(view.codes) == {"pixel", "semantic"} and view.depth == 2
    assert view.code_map("pixel", 1).size == (4 * 24, 4 * 24)  # 16 positions: a 4 x 4 map
    assert "PSNR" in view.summary() and "`semantic` (64 codes, 16 positions)" in view.summary()
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(ImageLoadError, match="not_an_image.png"):
        backend.tokenize(str(bad))


def test_run_logs_give_losses_learning_rate_and_checkpoints(demo_runs, tmp_path):
    (run,) = list_runs(demo_runs)
    log = read_run(run)
    assert [r["step"] for r in log.records] == [1, 2, 3, 4]
    assert log.loss_names() == ["loss", "text_loss", "visual_loss/pixel", "visual_loss/semantic"]
    losses = log.series(log.loss_names())
    assert len(losses) == 16 and set(losses["series"]) == set(log.loss_names())
    assert len(log.metric("learning rate")) == 4 and len(log.metric("tokens/s")) == 4
    assert log.checkpoint_table() == [["checkpoint-2", "complete"], ["checkpoint-4", "complete"]]
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"train_log.jsonl:2:2: invalid JSON: Expecting property name"):
        read_run(tmp_path)
    with pytest.raises(DemoInputError, match="no training log there"):
        read_run(tmp_path / "nowhere")


def test_demo_program_reports_a_missing_model_in_one_line(tmp_path, capsys):
    from unimm.cli import demo

    for argv, message in (([], "pass --run_dir (a run folder such as runs/quickstart) or --model_path"),
                          (["--run_dir", str(tmp_path / "nowhere")], f"run_dir={tmp_path / 'nowhere'}: not a folder"),
                          (["--run_dir", str(tmp_path)], "holds no UniMM model")):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_the_quickstart_prints_a_demo_command_that_parses():
    """The quickstart's last lines name `bash scripts/demo.sh --run_dir $OUT`; its flags are unimm-demo's."""
    import re
    import shlex
    from pathlib import Path

    from unimm.cli import demo

    root = Path(__file__).resolve().parents[2]
    (line,) = [line for line in (root / "scripts/quickstart.sh").read_text().splitlines() if "scripts/demo.sh" in line]
    command = shlex.split(re.search(r'"[^"]*: (bash scripts/demo\.sh [^"]*)"', line).group(1).replace("$OUT", "runs/x"))
    assert command[:2] == ["bash", "scripts/demo.sh"] and (root / command[1]).is_file()
    args, _ = demo.parse_args(command[2:])
    assert args.run_dir == "runs/x" and args.model_path is None
    assert "exec python scripts/demo.py" in (root / "scripts/demo.sh").read_text()

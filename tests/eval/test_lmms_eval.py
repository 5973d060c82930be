"""The `unimm` model of lmms-eval (unimm/eval/lmms.py).

The end-to-end test runs lmms-eval's own CLI in a fresh interpreter on local tasks over shapes images (a
generate_until task and a multi-round task) and checks the scores against answers and
log-likelihoods computed here directly with the UniMM model. The unit tests check `loglikelihood` against a manual
computation, and batched generation against one prompt at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

from unimm.data.toy.shapes import COLOUR_QUESTION, SHAPE_QUESTION, ShapesDataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 6


# ---------------------------------------------------------------------------------------------- direct reference


class Reference:
    """The UniMM model driven directly (the chat.py way: one prompt at a time, no padding), to compare with."""

    def __init__(self, model_path: Path, visual_tokenizer_path: Path):
        from unimm.data.tasks import SampleConfig, SampleFactory
        from unimm.inference.stack import load_for_inference
        from unimm.tokenizer import load_visual_tokenizer

        self.model, self.tokenizer = load_for_inference(model_path, torch.device("cpu"), "float32")
        self.visual = load_visual_tokenizer(visual_tokenizer_path)
        self.factory = SampleFactory(self.tokenizer, self.model.config.layout, SampleConfig(max_length=None))

    def prompt(self, image, question: str):
        from unimm.data.sequence import ImageSlot
        from unimm.data.templates import ChatMessage

        pixels = self.visual.preprocess(image.convert("RGB"))
        with torch.no_grad():
            if self.model.feature_projector is not None:
                slot = ImageSlot(features=self.visual.encode_features(pixels)[0])
            else:
                slot = ImageSlot(codes={g: c[0] for g, c in self.visual.encode(pixels).items()})
        return self.factory.generation_prompt([ChatMessage("user", [slot, "\n", question])])

    def answer(self, image, question: str, max_new_tokens: int = MAX_NEW_TOKENS, stop: str | None = "\n") -> str:
        from unimm.llm.generation import generate_text

        sample = self.prompt(image, question)
        codes = {g: c[None] for g, c in sample.visual_codes.items()} if sample.visual_codes else None
        features = torch.stack(sample.image_features) if sample.image_features else None
        (text,) = generate_text(self.model, self.tokenizer, sample.input_ids[None], visual_codes=codes,
                                image_features=features, max_new_tokens=max_new_tokens)
        return text.split(stop)[0] if stop else text

    @torch.no_grad()
    def loglikelihood(self, image, question: str, continuation: str) -> tuple[float, bool]:
        """Prompt ids + the continuation tokenised on its own, one forward pass, log-probs summed by hand."""
        sample = self.prompt(image, question)
        continuation_ids = self.tokenizer(continuation, add_special_tokens=False).input_ids
        input_ids = torch.cat([sample.input_ids, torch.tensor(continuation_ids)])
        codes = None
        if sample.visual_codes:
            codes = {g: torch.cat([c, c.new_full((len(continuation_ids), c.shape[1]), -1)])[None]
                     for g, c in sample.visual_codes.items()}
        features = torch.stack(sample.image_features) if sample.image_features else None
        logits = self.model(input_ids=input_ids[None], visual_codes=codes, image_features=features).logits[0]
        total, greedy = 0.0, True
        for k, token in enumerate(continuation_ids):
            row = logits[len(sample) - 1 + k].double().log_softmax(-1)
            total += float(row[token])
            greedy &= int(row.argmax()) == token
        return total, greedy


# ---------------------------------------------------------------------------------------------- the local task

TASK_UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def rounds_doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                       previous_round_info=None):
    questions = doc["round_questions"]
    if round_idx is None:
        return questions[0]
    if round_idx < len(questions):
        return doc_to_visual(doc), questions[round_idx], False, previous_output, None
    return None, None, True, previous_output, None


def rounds_process_results(doc, results):
    answers = results[0]
    hits = [a.strip() == t for a, t in zip(answers, doc["round_answers"])]
    return {"rounds_exact_match": sum(hits) / len(doc["round_answers"])}
'''

COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
doc_to_visual: !function utils.doc_to_visual
metadata:
  version: 0.0
"""

TASKS = {
    "unimm_shapes_qa": """task: unimm_shapes_qa
output_type: generate_until
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_new_tokens: {max_new_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "unimm_shapes_rounds": """task: unimm_shapes_rounds
output_type: generate_until_multi_round
doc_to_text: !function utils.rounds_doc_to_text
doc_to_target: answer
process_results: !function utils.rounds_process_results
generation_kwargs:
  until: ["\\n"]
  max_new_tokens: {max_new_tokens}
metric_list:
  - metric: rounds_exact_match
    aggregation: mean
    higher_is_better: true
""",
}


def write_shapes_tasks(root: Path, reference: Reference, num_docs: int = 4) -> list[dict]:
    """Images, a JSONL of docs and the task YAMLs (+ utils.py) under `root`. The first two docs of the
    question task take the model's own answer as target, so its exact_match is known and above zero."""
    images = root / "images"
    images.mkdir(parents=True)
    docs = []
    for i, sample in enumerate(ShapesDataset(num_docs, seed=3)):
        path = images / f"{sample.id}.png"
        sample.image.save(path)
        question = SHAPE_QUESTION
        answer = reference.answer(sample.image, question) if i < 2 else sample.shape
        docs.append({"id": sample.id, "image": str(path), "question": question, "answer": answer,
                     "round_questions": [COLOUR_QUESTION, SHAPE_QUESTION],
                     "round_answers": [sample.colour, sample.shape]})
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "utils.py").write_text(TASK_UTILS)
    for name, body in TASKS.items():
        yaml_text = body.format(max_new_tokens=MAX_NEW_TOKENS) + COMMON.format(docs=root / "docs.jsonl")
        (root / f"{name}.yaml").write_text(yaml_text)
    return docs


def write_local_benchmarks(root: Path) -> list[str]:
    """lmms-eval's own MME and POPE tasks on a local copy, the way the README tells users to point them at one: a
    Hub-layout parquet folder (here 2 shapes images x a yes and a no question, in MME's and POPE's columns) and a
    task YAML that includes the bundled one and overrides dataset_path. Returns the task names."""
    import datasets
    import lmms_eval

    from unimm.data.toy.shapes import ShapesDataset

    rows = {"question_id": [], "image": [], "question": [], "answer": [], "category": []}
    for i, sample in enumerate(ShapesDataset(2, seed=7)):
        for question, answer in ((f"Is the shape {sample.colour}? Please answer yes or no.", "Yes"),
                                 (f"Is the shape a {sample.shape} at the {sample.position}? Please answer yes or no.",
                                  "Yes" if i else "No")):
            rows["question_id"].append(f"shapes/{i}.png")
            rows["image"].append(sample.image)
            rows["question"].append(question)
            rows["answer"].append(answer)
            rows["category"].append("color")
    features = datasets.Features({**{k: datasets.Value("string") for k in rows}, "image": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(root / "local_copy/data/test-00000-of-00001.parquet")
    bundled = Path(lmms_eval.__file__).parent / "tasks"
    for name, yaml_file in (("mme_local", bundled / "mme/mme.yaml"), ("pope_local", bundled / "pope/pope.yaml")):
        (root / f"{name}.yaml").write_text(f"include: {yaml_file}\ntask: {name}\ndataset_path: {root / 'local_copy'}\n"
                                           "dataset_kwargs:\n  token: false\n")
    return ["mme_local", "pope_local"]


def run_lmms_eval(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "lmms_eval", *args]
    proc = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, timeout=600)
    # lmms-eval 0.7.3 logs "Error during evaluation" and still exits 0
    if proc.returncode != 0 or "Error during evaluation" in proc.stdout + proc.stderr:
        raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_samples(output: Path, task: str) -> list[dict]:
    (path,) = output.rglob(f"*samples_{task}.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


@pytest.mark.slow
def test_lmms_eval_cli_scores_a_local_task(tmp_path, unimm_codes_path, visual_tokenizer_path):
    from PIL import Image

    reference = Reference(unimm_codes_path, visual_tokenizer_path)
    docs = write_shapes_tasks(tmp_path / "tasks", reference)
    benchmarks = write_local_benchmarks(tmp_path / "tasks")
    output = tmp_path / "results"
    run_lmms_eval(["--model", "unimm", "--model_args",
                   f"pretrained={unimm_codes_path},visual_tokenizer={visual_tokenizer_path},device=cpu",
                   "--tasks", ",".join([*TASKS, *benchmarks]), "--include_path", str(tmp_path / "tasks"),
                   "--batch_size", "3", "--output_path", str(output), "--log_samples"], home=tmp_path)

    (results_file,) = output.rglob("*_results.json")
    report = json.loads(results_file.read_text())
    results = report["results"]
    images = [Image.open(d["image"]) for d in docs]

    # generate_until: the logged answers are the model's own greedy answers, scored by lmms-eval's exact_match
    answers = [reference.answer(image, d["question"]) for image, d in zip(images, docs)]
    samples = read_samples(output, "unimm_shapes_qa")
    assert [s["filtered_resps"] for s in samples] == answers
    expected = sum(a.strip() == d["answer"] for a, d in zip(answers, docs)) / len(docs)
    score = results["unimm_shapes_qa"]["exact_match,none"]
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    assert score == pytest.approx(expected) and score >= 0.5

    # multi-round: two answers per doc, each the model's answer to that round's question
    samples = read_samples(output, "unimm_shapes_rounds")
    hits = []
    for sample, image, doc in zip(samples, images, docs):
        round_answers = [reference.answer(image, q) for q in doc["round_questions"]]
        assert sample["filtered_resps"] == round_answers
        hits += [a.strip() == t for a, t in zip(round_answers, doc["round_answers"])]
    score = results["unimm_shapes_rounds"]["rounds_exact_match,none"]
    assert 0.0 <= score <= 1.0 and score == pytest.approx(sum(hits) / len(hits))

    # the bundled MME and POPE tasks on the local copy: their own prompts, answered by the model, scored by their
    # own metrics (MME: 0-200 per category, here one; POPE: fractions)
    import datasets

    local_copy = datasets.load_dataset(str(tmp_path / "tasks" / "local_copy"), split="test")
    for task in benchmarks:
        samples = read_samples(output, task)
        generation = report["configs"][task]["generation_kwargs"]
        max_new_tokens = generation["max_new_tokens"]  # MME 16, POPE 128
        until = generation.get("until") or []
        until = [until] if isinstance(until, str) else until  # the task's stop strings (lmms-eval's default too)
        assert [s["doc_id"] for s in samples] == list(range(len(local_copy)))
        for sample, row in zip(samples, local_copy):
            assert sample["input"].startswith(row["question"].replace(" Please answer yes or no.", ""))
            expected = reference.answer(row["image"], sample["input"], max_new_tokens, stop=None)
            for stop in until:  # cut at the first stop string, as generate_until does
                expected = expected.split(stop)[0] if stop else expected
            assert sample["filtered_resps"] == expected
    assert 0.0 <= results["mme_local"]["mme_perception_score,none"] <= 200.0
    for metric in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score"):
        assert 0.0 <= results["pope_local"][f"{metric},none"] <= 1.0


# ---------------------------------------------------------------------------------------------- unit tests


def make_model(model_path: Path, visual_tokenizer_path: Path, docs: list[dict], batch_size: int = 1):
    from unimm.eval.lmms import UniMMLmms

    lmm = UniMMLmms(pretrained=str(model_path), visual_tokenizer=str(visual_tokenizer_path), device="cpu",
                    dtype="float32", batch_size=batch_size)
    lmm.task_dict = {"shapes": {"test": docs}}
    return lmm


def shapes_docs(num_docs: int) -> list[dict]:
    return [{"image": s.image, "question": q} for s, q in zip(
        ShapesDataset(num_docs, seed=5), [COLOUR_QUESTION, SHAPE_QUESTION, "Is there a shape in the image?"] * 4)]


def make_request(kind: str, arguments: tuple):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=arguments, idx=0,
                    metadata={"task": "shapes", "doc_id": arguments[3], "repeats": 1})


def doc_to_visual(doc):
    return [doc["image"]]


@pytest.mark.parametrize("model_fixture", ["unimm_codes_path", "unimm_features_path"])
def test_loglikelihood_is_the_summed_log_probability_of_the_continuation(request, model_fixture,
                                                                         visual_tokenizer_path):
    model_path = request.getfixturevalue(model_fixture)
    docs = shapes_docs(2)
    lmm = make_model(model_path, visual_tokenizer_path, docs, batch_size=2)
    reference = Reference(model_path, visual_tokenizer_path)
    # the model's first greedy token as a continuation: greedy by construction
    first = reference.model(**_prompt_inputs(reference.prompt(docs[0]["image"], docs[0]["question"]))).logits[0, -1]
    greedy_text = reference.tokenizer.decode([int(first.argmax())])
    cases = [(0, " red square"), (1, "a circle at the top left"), (0, greedy_text)]

    def target_of(text):
        return lambda doc: text  # a loglikelihood task's doc_to_target

    requests = [make_request("loglikelihood", (docs[i]["question"], target_of(text), doc_to_visual, i, "shapes",
                                               "test")) for i, text in cases]
    got = lmm.loglikelihood(requests)
    for (i, text), (logprob, greedy) in zip(cases, got):
        want_logprob, want_greedy = reference.loglikelihood(docs[i]["image"], docs[i]["question"], text)
        assert logprob == pytest.approx(want_logprob, rel=1e-4, abs=1e-4)
        assert logprob < 0 and greedy == want_greedy
    assert [g for _, g in got] == [False, False, True]
    # multiple_choice requests (continuation as a string) are refused: lmms-eval would take their argmin
    choice = make_request("loglikelihood", (docs[1]["question"], " red", doc_to_visual, 1, "shapes", "test"))
    with pytest.raises(ValueError, match="shapes/1: multiple_choice tasks are not supported"):
        lmm.loglikelihood([choice])


def _prompt_inputs(sample):
    codes = {g: c[None] for g, c in sample.visual_codes.items()} if sample.visual_codes else None
    features = torch.stack(sample.image_features) if sample.image_features else None
    return {"input_ids": sample.input_ids[None], "visual_codes": codes, "image_features": features}


@pytest.mark.parametrize("model_fixture", ["unimm_codes_path", "unimm_features_path"])
def test_batched_generation_matches_one_prompt_at_a_time(request, model_fixture, visual_tokenizer_path):
    model_path = request.getfixturevalue(model_fixture)
    docs = shapes_docs(5)
    docs[3]["question"] = "<image>\nThe shape, described in a few words and then some more:"  # longest prompt
    gen_kwargs = {"until": ["\n"], "max_new_tokens": MAX_NEW_TOKENS, "do_sample": False, "temperature": 0}
    requests = [make_request("generate_until", (d["question"], dict(gen_kwargs), doc_to_visual, i, "shapes", "test"))
                for i, d in enumerate(docs)]
    one_by_one = make_model(model_path, visual_tokenizer_path, docs, batch_size=1).generate_until(requests)
    batched = make_model(model_path, visual_tokenizer_path, docs, batch_size=4).generate_until(requests)
    assert batched == one_by_one
    reference = Reference(model_path, visual_tokenizer_path)
    assert one_by_one[0] == reference.answer(docs[0]["image"], docs[0]["question"])
    assert all("\n" not in answer for answer in batched)


def test_prompt_errors_name_the_request(unimm_codes_path, visual_tokenizer_path):
    docs = shapes_docs(1)
    lmm = make_model(unimm_codes_path, visual_tokenizer_path, docs)
    two_marks = make_request("generate_until", ("<image> and <image>?", {}, doc_to_visual, 0, "shapes", "test"))
    with pytest.raises(ValueError, match=r"shapes/0: the prompt marks 2 <image> but the task gives 1 image"):
        lmm.generate_until([two_marks])
    beams = make_request("generate_until", ("?", {"num_beams": 3}, doc_to_visual, 0, "shapes", "test"))
    with pytest.raises(ValueError, match="num_beams=3"):
        lmm.generate_until([beams])


def test_a_different_visual_tokenizer_is_refused(unimm_codes_path, tmp_path):
    from unimm.llm.identity import VisualTokenizerMismatchError
    from unimm.tokenizer import build_tokenizer

    other = tmp_path / "other_visual_tokenizer"  # same codebook spec, other weights
    build_tokenizer("dualtoken-tiny", image_size=32, patch_size=8, encoder_hidden_size=32, pixel_num_codes=64,
                    semantic_num_codes=64, seed=1).save_pretrained(other)
    with pytest.raises(VisualTokenizerMismatchError):
        make_model(unimm_codes_path, other, [])

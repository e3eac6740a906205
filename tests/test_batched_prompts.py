"""Several prompts in one ``/v1/completions`` request (a list of strings, of token-id lists), as the
OpenAI API and vLLM take them, through a real server and the official ``openai`` client; and
EleutherAI's lm-evaluation-harness (``local-completions``, its defaults: token-id prompts with
``echo`` and ``logprobs``) end to end on a small local task."""

import json
import os
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from bench.loopback import LoopbackServer
from server.app import create_app
from server.engine import Limits

PROMPTS = ["The patient was given", "The court ruled that the licensee"]
LIMITS = Limits(max_running=8, max_prompt_tokens=96, max_new_tokens=64, max_seq_len=160, max_prompts=4,
                max_choices=6)


@pytest.fixture(scope="module")
def conf(built):
    return built("llama", domains=("medical", "legal", "code"))


@pytest.fixture(scope="module")
def loaded(conf):
    from index_store.loader import load_constellation

    return load_constellation(conf)


@pytest.fixture(scope="module")
def app(loaded):
    return create_app(loaded, LIMITS)


@pytest.fixture(scope="module")
def url(app):
    with LoopbackServer(app) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def create(client, prompt, **kw):
    return client.completions.create(model="constellation", prompt=prompt, **kw)


def ids_of(loaded, text):
    return loaded.tokenizer(text, add_special_tokens=True)["input_ids"]


def same_composition(a: dict, b: dict) -> bool:
    return a["mode"] == b["mode"] and a["selected"] == b["selected"] and \
        a["alpha"] == pytest.approx(b["alpha"], abs=1e-4)


# ---- several prompts -------------------------------------------------------------------------------
def test_each_prompt_is_answered_as_if_alone(client, loaded, app):
    """Strings or token-id lists: prompt p's choice i is choices[p * n + i], each as the prompt alone
    gives it (text, logprobs, composition: each prompt is planned on its own); usage sums."""
    kw = dict(max_tokens=5, n=2, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    alone = [create(client, p, **kw) for p in PROMPTS]
    steps = app.state.engine.steps
    both = create(client, PROMPTS, **kw)
    decode_steps = app.state.engine.steps - steps
    as_ids = create(client, [ids_of(loaded, p) for p in PROMPTS], **kw)
    for r in (both, as_ids):
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        for p, one in enumerate(alone):
            for i in range(2):
                got, want = r.choices[p * 2 + i], one.choices[i]
                assert got.text == want.text and got.finish_reason == "length"
                assert got.logprobs.token_logprobs == pytest.approx(want.logprobs.token_logprobs, abs=1e-4)
        assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
        assert r.usage.completion_tokens == 20 == sum(a.usage.completion_tokens for a in alone)
        assert isinstance(r.composition, list) and len(r.composition) == 2
        assert all(same_composition(c, a.composition) for c, a in zip(r.composition, alone))
    assert alone[0].composition["selected"] != alone[1].composition["selected"]  # (so the check above can fail)
    # submitted together, so they decoded together: 4 tokens after the prefill's, not 4 per prompt
    assert decode_steps <= 5
    assert isinstance(create(client, ["The patient"], max_tokens=1).composition, dict)  # one prompt: unchanged


def test_streamed_prompts_number_their_choices(client):
    """Streamed, choice index = prompt * n + i; with echo each choice starts with its own prompt; each
    prompt's composition comes on the first chunk of its choices; usage sums."""
    kw = dict(max_tokens=4, n=2, temperature=0, echo=True, extra_body={"ignore_eos": True})
    whole = create(client, PROMPTS, **kw)
    chunks = list(create(client, PROMPTS, stream=True, stream_options={"include_usage": True}, **kw))
    texts, compositions = {}, {}
    for ch in chunks[:-1]:
        (c,) = ch.choices
        texts[c.index] = texts.get(c.index, "") + c.text
        p, comp = c.index // 2, getattr(ch, "composition", None)
        assert (comp is not None) == (p not in compositions)  # on the prompt's first chunk only
        compositions.setdefault(p, comp)
    assert texts == {c.index: c.text for c in whole.choices}
    assert all(texts[p * 2 + i].startswith(PROMPTS[p]) for p in range(2) for i in range(2))
    assert sorted(compositions) == [0, 1]
    assert all(same_composition(compositions[p], whole.composition[p]) for p in range(2))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_scoring_several_prompts(client, loaded):
    """``max_tokens=0`` with ``echo``: each prompt scored as alone, n copies each; streamed, a chunk
    per prompt with its composition."""
    prompts = [ids_of(loaded, p) for p in PROMPTS] + [ids_of(loaded, "def parse(string): return")]
    kw = dict(max_tokens=0, echo=True, logprobs=2)
    alone = [create(client, p, **kw) for p in prompts]
    r = create(client, prompts, n=2, **kw)
    assert [c.index for c in r.choices] == list(range(6)) and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == sum(len(p) for p in prompts)
    for k, c in enumerate(r.choices):
        want = alone[k // 2].choices[0]
        assert c.text == want.text and c.logprobs.tokens == want.logprobs.tokens
        assert c.logprobs.token_logprobs[1:] == pytest.approx(want.logprobs.token_logprobs[1:], abs=1e-4)
    assert [x["selected"] for x in r.composition] == [a.composition["selected"] for a in alone]
    chunks = list(create(client, prompts, stream=True, **kw))
    assert [[c.index for c in ch.choices] for ch in chunks] == [[0], [1], [2]]
    assert [ch.composition["selected"] for ch in chunks] == [a.composition["selected"] for a in alone]


def test_best_of_per_prompt(client):
    kw = dict(max_tokens=4, temperature=1.0, seed=7, best_of=3)
    alone = [create(client, p, **kw).choices[0].text for p in PROMPTS]
    r = create(client, PROMPTS, **kw)
    assert [c.index for c in r.choices] == [0, 1] and [c.text for c in r.choices] == alone


def test_bounds_and_bad_prompts_are_400_naming_the_parameter(client, url):
    bad = [  # (prompt, extra fields, param, words in the message)
        (["x"] * 5, {}, "prompt", "at most 4"),
        (["x"] * 3, {"n": 3}, "n", "at most 6"),
        (["x"] * 2, {"best_of": 4}, "best_of", "at most 6"),
        ([], {}, "prompt", "empty"),
        ([[5, 6], "x"], {}, "prompt", "token ids"),
        ([[5, 6], [7, True]], {}, "prompt", "token ids"),
        ([[5, 6], [7, 10**9]], {}, "prompt", "prompt 1:"),
        (["The patient", ""], {}, "prompt", "prompt 1:"),
        ([[5, 6], [7] * 97], {}, "prompt", "prompt 1:"),
        ([[5, 6], []], {"max_tokens": 0, "echo": True}, "prompt", "prompt 1:"),
    ]
    for prompt, extra, param, words in bad:
        r = httpx.post(url + "/v1/completions", json={"model": "constellation", "prompt": prompt, "max_tokens": 1,
                                                      **extra})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param and words in err["message"], (prompt, err)
    assert len(create(client, ["x"] * 4, max_tokens=1).choices) == 4  # the limits themselves are served
    assert len(create(client, ["x"] * 2, n=3, max_tokens=1).choices) == 6


def aborted(url) -> float:
    m = re.search(r'constellation_request_success_total\{finished_reason="abort"[^}]*\} (\S+)',
                  httpx.get(url + "/metrics").text)
    return float(m[1]) if m else 0.0


def test_a_disconnect_cancels_every_prompt(url, app):
    body = {"model": "constellation", "prompt": PROMPTS + ["The enzyme"], "max_tokens": 64, "stream": True,
            "ignore_eos": True}
    engine, before = app.state.engine, aborted(url)
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # the first token: hang up
    deadline = time.time() + 10
    while (engine.num_running or engine.num_waiting) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.num_running == 0 and engine.num_waiting == 0 and engine.cache.used == 0
    assert aborted(url) - before == 3  # each prompt's sequence ended as "abort", none ran to its length


# ---- lm-evaluation-harness -------------------------------------------------------------------------
MC = [  # a four-way multiple-choice task: the harness scores "question + ' ' + choice" per choice
    {"question": "The patient has a fever and a cough. The doctor orders a", "choices": ["biopsy", "contract",
                                                                                          "compiler", "photon"],
     "answer": 0},
    {"question": "The licensee breached the", "choices": ["enzyme", "contract", "lambda", "tumor"], "answer": 1},
    {"question": "def parse(string): return", "choices": ["plaintiff", "fever", "tuple", "genome"], "answer": 2},
    {"question": "The enzyme binds the protein at the cell", "choices": ["warranty", "loop", "dose", "membrane"],
     "answer": 3},
]
GEN = [{"question": "The patient was given a", "answer": " dose"}, {"question": "The court ruled", "answer": " on"}]
TASKS = {
    "constellation_mc": ("mc.jsonl", MC, """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
"""),
    "constellation_gen": ("gen.jsonl", GEN, """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
"""),
}


def write_tasks(folder):
    for name, (data, rows, body) in TASKS.items():
        (folder / data).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"    test: {folder / data}\ntest_split: test\n{body}")


def test_lm_evaluation_harness_end_to_end(url, client, conf, tmp_path):
    """``lm_eval --model local-completions`` with its defaults (token-id prompts, ``[[ids]]``, with
    echo and logprobs for loglikelihoods) runs both tasks; its loglikelihoods are the server's own
    echo scoring of the same tokens, and its generations the server's greedy completions."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    tokenizer = conf.parent / "models" / "generalist"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",  # as docs/server.md has it
           "--model_args", f"base_url={url}/v1/completions,model=constellation,tokenizer={tokenizer}",
           "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--output_path", str(tmp_path / "out"),
           "--log_samples"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    scores = json.loads(results.read_text())["results"]
    assert 0.0 <= scores["constellation_mc"]["acc,none"] <= 1.0
    assert 0.0 <= scores["constellation_gen"]["exact_match,none"] <= 1.0
    samples = {name: [json.loads(line) for f in (tmp_path / "out").rglob(f"samples_{name}_*.jsonl")
                      for line in f.read_text().splitlines()] for name in TASKS}
    assert len(samples["constellation_mc"]) == len(MC) and len(samples["constellation_gen"]) == len(GEN)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    first = next(s for s in samples["constellation_mc"] if s["doc_id"] == 0)
    context = MC[0]["question"]
    whole = [tok(context + " " + c, add_special_tokens=False)["input_ids"] for c in MC[0]["choices"]]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    scored = create(client, whole, max_tokens=0, echo=True, logprobs=1)  # the four in one request
    mine = [sum(c.logprobs.token_logprobs[n_ctx:]) for c in scored.choices]
    theirs = [float(r[0][0]) for r in first["resps"]]
    assert theirs == pytest.approx(mine, abs=1e-3)
    for s in samples["constellation_gen"]:
        ids = tok(GEN[s["doc_id"]]["question"], add_special_tokens=False)["input_ids"]
        greedy = create(client, ids, max_tokens=4, temperature=0, stop=["\n", tok.eos_token]).choices[0].text
        assert s["resps"][0][0] == greedy

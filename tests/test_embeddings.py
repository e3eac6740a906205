"""``POST /v1/embeddings`` (the prompt's fingerprint, the vector the index projects), ``/tokenize`` and
``/detokenize`` (issue "The OpenAI surface that applications are built on", item 5), through a real
server on a loopback port, the official ``openai`` client and LangChain's ``OpenAIEmbeddings``."""

import base64

import httpx
import numpy as np
import openai
import pytest

from bench.loopback import LoopbackServer
from server.app import create_app
from server.engine import Limits
from server.serving_embedding import MAX_INPUTS

PROMPT = "The patient presented with fever and a renal lesion"
TEXTS = ["The court", "The licensee shall indemnify the licensor against all claims", "def parse(x): return x",
         "The enzyme", "The protein enzyme photon electron molecule membrane quantum catalyst genome cell",
         "The contract clause", "The patient", "fever cough lesion biopsy dose tumor renal cardiac symptom"]


@pytest.fixture(scope="module")
def served(built):
    from index_store.loader import load_constellation

    loaded = load_constellation(built("llama", domains=("medical", "legal", "code")))
    # a small prefill chunk: a batch of inputs goes to the engine in several calls
    app = create_app(loaded, Limits(max_running=4, max_prompt_tokens=64, max_new_tokens=8, max_seq_len=128,
                                    prefill_chunk_max=48, prefill_chunk_min=8))
    with LoopbackServer(app) as url:
        yield url, loaded


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float64)


def test_the_embedding_is_the_fingerprint_the_index_projects(client, served):
    url, loaded = served
    c = loaded.constellation
    r = client.embeddings.create(model="constellation", input=PROMPT, encoding_format="float")
    e = vectors(r)[0]
    assert r.model == "constellation" and len(r.data) == 1 and r.data[0].index == 0
    assert e.shape == (c.d,) and np.linalg.norm(e) == pytest.approx(1.0, abs=1e-6)
    ids = loaded.tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (len(ids), len(ids))
    # alpha_k = <embedding, basis_k>: what /explain reports for the same prompt
    alpha = httpx.post(url + "/explain", json={"prompt": PROMPT}).json()["alpha"]
    assert list(e @ c.basis.numpy().T) == pytest.approx([alpha[d] for d in c.domains], abs=1e-5)
    # a model name that picks a mode or a specialist embeds the same (the fingerprint is the generalist's)
    legal = client.embeddings.create(model="legal", input=PROMPT, encoding_format="float")
    assert legal.model == "legal" and vectors(legal)[0] == pytest.approx(e, abs=1e-6)


def test_batches_token_ids_and_base64(client, served):
    url, loaded = served
    one = np.stack([vectors(client.embeddings.create(model="constellation", input=t, encoding_format="float"))[0]
                    for t in TEXTS])
    assert np.abs(one[0] - one[1]).max() > 1e-3  # different prompts, different vectors
    # the batch (several engine calls of similar lengths, answered in input order) equals each alone
    batch = client.embeddings.create(model="constellation", input=TEXTS, encoding_format="float")
    assert [d.index for d in batch.data] == list(range(len(TEXTS)))
    assert vectors(batch) == pytest.approx(one, abs=1e-5)
    ids = [loaded.tokenizer(t, add_special_tokens=True)["input_ids"] for t in TEXTS]
    assert batch.usage.prompt_tokens == sum(map(len, ids))
    # token ids: one list, and a list of lists
    assert vectors(client.embeddings.create(model="constellation", input=ids[1], encoding_format="float"))[0] == \
        pytest.approx(one[1], abs=1e-5)
    assert vectors(client.embeddings.create(model="constellation", input=ids, encoding_format="float")) == \
        pytest.approx(one, abs=1e-5)
    # base64 (the openai client's default: it asks for base64 and decodes) holds the same float32 values
    assert vectors(client.embeddings.create(model="constellation", input=TEXTS)) == pytest.approx(one, abs=1e-5)
    raw = httpx.post(url + "/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"}).json()
    floats = httpx.post(url + "/v1/embeddings", json={"input": TEXTS[:2]}).json()
    for b, f in zip(raw["data"], floats["data"]):
        assert np.frombuffer(base64.b64decode(b["embedding"]), "<f4").tolist() == f["embedding"]


BAD = [  # (body, status, the parameter the error names, a word of the message)
    ({"input": []}, 400, "input", "not empty"),
    ({"input": ["a", 5]}, 400, "input", "item 1"),
    ({"input": [True]}, 400, "input", "item 0"),
    ({"input": ""}, 400, "input", "0 tokens"),
    ({"input": ["ok", ""]}, 400, "input", "input[1]"),
    ({"input": [1, 2, 10**6]}, 400, "input", "token ids"),
    ({"input": "fever " * 80}, 400, "input", "1..64"),
    ({"input": ["a"] * (MAX_INPUTS + 1)}, 400, "input", str(MAX_INPUTS)),
    ({"input": "x", "dimensions": 7}, 400, "dimensions", "omit dimensions"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", "float"),
    ({"input": "x", "truncate": True}, 400, "truncate", "unrecognized"),
    ({"input": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("body,status,param,says", BAD)
def test_bad_embedding_requests(served, body, status, param, says):
    r = httpx.post(served[0] + "/v1/embeddings", json=body)
    err = r.json()["error"]
    assert r.status_code == status and err["param"] == param and says in err["message"], err
    if "1..64" in says:
        assert err["code"] == "context_length_exceeded"


def test_dimensions_of_the_fingerprint_itself_are_accepted(client, served):
    d = served[1].constellation.d
    assert len(client.embeddings.create(model="constellation", input="x", dimensions=d).data[0].embedding) == d


def test_langchain_openai_embeddings(client, served):
    """LangChain's ``OpenAIEmbeddings`` with the settings for a non-OpenAI server: the texts go as
    strings (``check_embedding_ctx_length=False``; its default tokenizes with tiktoken, which
    downloads an encoding and sends OpenAI's token ids)."""
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(model="constellation", base_url=served[0] + "/v1", api_key="unused",
                           check_embedding_ctx_length=False, chunk_size=3, max_retries=0)
    docs = emb.embed_documents(TEXTS)
    want = vectors(client.embeddings.create(model="constellation", input=TEXTS, encoding_format="float"))
    assert np.array(docs) == pytest.approx(want, abs=1e-5)
    assert emb.embed_query(TEXTS[2]) == pytest.approx(list(want[2]), abs=1e-5)


def test_tokenize_and_detokenize(served):
    url, loaded = served
    tok = loaded.tokenizer
    r = httpx.post(url + "/tokenize", json={"model": "constellation", "prompt": PROMPT, "return_token_strs": True})
    ids = tok(PROMPT, add_special_tokens=True)["input_ids"]
    assert r.json() == {"count": len(ids), "max_model_len": 128, "tokens": ids,
                        "token_strs": tok.convert_ids_to_tokens(ids)}
    plain = httpx.post(url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert plain["tokens"] == tok(PROMPT, add_special_tokens=False)["input_ids"] and plain["token_strs"] is None
    # messages: exactly the prompt /v1/chat/completions runs (its usage counts the same tokens)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The patient"}]
    chat_ids = httpx.post(url + "/tokenize", json={"messages": msgs}).json()["tokens"]
    chat = httpx.post(url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}).json()
    assert len(chat_ids) == chat["usage"]["prompt_tokens"]
    assert tok.decode(chat_ids) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert httpx.post(url + "/detokenize", json={"model": "legal", "tokens": ids}).json() == {"prompt": tok.decode(ids)}
    assert tok.decode(ids) == PROMPT
    for path, body, param in (("/tokenize", {"prompt": "x", "messages": msgs}, "prompt"),
                              ("/tokenize", {}, "prompt"),
                              ("/tokenize", {"messages": msgs, "add_special_tokens": True}, "add_special_tokens"),
                              ("/tokenize", {"prompt": "x", "model": "nope"}, "model"),
                              ("/detokenize", {"tokens": [1, -1]}, "tokens"),
                              ("/detokenize", {"tokens": [10**6]}, "tokens")):
        r = httpx.post(url + path, json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (path, body, r.text)

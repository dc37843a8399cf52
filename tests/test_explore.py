"""explore.py, through its HTTP API on a real server (a subprocess on an ephemeral loopback port).

Every number the page shows is checked against the code it claims to come from: the next-token stages
against `infer.process_logits`, the bits per byte against `eval_val.py` run on the same text, the attention
weights against each layer's own output (recomputed as weights @ V through o_proj, for a GQA model and a
sliding-window one), generation against `infer.generate`. Every bad request gets HTTP 400 with one JSON
line and the server keeps serving; bad start-up input exits 2 with one line; Ctrl-C stops it cleanly.
The browser side is tests/test_explore_browser.py.

    python -m pytest -q tests/test_explore.py
"""

import argparse
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import cli
import explore
import infer
from conftest import ROOT, run_script, write_config
from infer import load_model
from plots import read_losses
from chat import format_instruction
from tokenizer import load_tokenizer

TEXT = "The cat sat on the mat. Caf\u00e9 au lait, na\u00efve \U0001f916"  # 2-byte characters; the robot emoji is 3 tokens


# ---------------------------------------------------------------------------------------------
# A folder of checkpoints, a server on it, and a client
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_run):
    """The shared tiny run's checkpoints and metrics.csv, plus swa.ckpt: a sliding-window (4) GQA model."""
    import train

    work = tmp_path_factory.mktemp("explore")
    for path in tiny_run.iterdir():
        if path.suffix in (".ckpt", ".json", ".csv"):
            shutil.copy(path, work / path.name)
    swa = tmp_path_factory.mktemp("explore_swa")
    assert train.main(["--config", str(write_config(swa, {"model": {"swa_window": 4}, "training": {
        "max_steps": 2, "val_every": 2, "save_every": 2}}))]) == 0
    shutil.copy(swa / "checkpoints" / "final.ckpt", work / "swa.ckpt")
    shutil.copy(swa / "checkpoints" / "final.ckpt.json", work / "swa.ckpt.json")
    return work


def start_server(*args, env=None):
    """Start `python explore.py ARGS`; return (process, port) once it prints its address."""
    process = subprocess.Popen([sys.executable, "explore.py", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    line = process.stdout.readline()  # blocks until the address line (or EOF if it failed)
    match = re.search(r"http://[\d.]+:(\d+)/", line)
    if not match:
        process.kill()
        raise AssertionError(f"explore.py printed {line!r}; stderr: {process.stderr.read()}")
    return process, int(match.group(1))


def stop_server(process) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    return process.returncode, err


@pytest.fixture(scope="module")
def port(folder):
    process, port = start_server("--ckpt", folder / "final.ckpt", "--port", 0)
    yield port
    stop_server(process)


def request(port, method, path, body=None, raw: bytes | None = None, headers=None):
    """(status, parsed JSON or text, response headers). body is sent as JSON, raw as given."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # no proxy, whatever the environment
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **(headers or {})} if data is not None else dict(headers or {})
    connection.request(method, path, body=data, headers=sent)
    response = connection.getresponse()
    text = response.read().decode()
    kind = response.getheader("Content-Type", "")
    answer = json.loads(text) if kind == "application/json" else text
    connection.close()
    return response.status, answer, dict(response.getheaders())


def post(port, path, body):
    status, answer, _ = request(port, "POST", path, body)
    assert status == 200, answer
    return answer


def stream(port, body) -> list[dict]:
    status, text, headers = request(port, "POST", "/api/generate", body)
    assert status == 200, text
    assert headers["Content-Type"] == "application/x-ndjson"
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def models(folder):
    """The checkpoints loaded in this process, to check the server's numbers against."""
    return {name: load_model(str(folder / name))[0] for name in ("final.ckpt", "swa.ckpt")}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2")


# ---------------------------------------------------------------------------------------------
# The page and /api/info
# ---------------------------------------------------------------------------------------------


def test_serves_its_page_files_and_no_other_path(port):
    status, html, headers = request(port, "GET", "/")
    assert status == 200 and "<title>Tiny Transformer explorer</title>" in html
    assert headers["Content-Security-Policy"] == "default-src 'self'"  # nothing from elsewhere: offline by design
    for path, kind in (("/explore.js", "text/javascript"), ("/explore.css", "text/css")):
        status, text, headers = request(port, "GET", path)
        assert status == 200 and headers["Content-Type"].startswith(kind) and len(text) > 1000
    assert "http" not in re.sub(r"http://www.w3.org/2000/svg", "", request(port, "GET", "/explore.js")[1])  # no CDN
    for path in ("/explore.py", "/../explore.py", "/%2e%2e/checkpoint.py", "/explore_page/index.html",
                 "/api/../../etc/passwd", "//etc/passwd", "/final.ckpt"):
        status, answer, _ = request(port, "GET", path)
        assert status == 400 and "unknown endpoint" in answer["error"], path


def test_info_lists_the_folders_checkpoints_by_step_and_the_loss_curve(port, folder):
    info = request(port, "GET", "/api/info")[1]
    names = [c["name"] for c in info["checkpoints"]]
    assert sorted(names) == sorted(p.name for p in folder.glob("*.ckpt"))
    steps = [c["step"] for c in info["checkpoints"]]
    assert steps == sorted(steps)
    assert names[info["main"]] == "final.ckpt"
    assert all(c["model_config"]["n_layers"] == 2 and c["kind"] == "pretrain" for c in info["checkpoints"])
    train, val = read_losses(str(folder / "metrics.csv"))
    assert info["losses"] == {"train": [list(x) for x in sorted(train.items())], "val": [list(x) for x in sorted(val.items())]}
    assert set(info["settings"]) == set(explore.SETTINGS)


# ---------------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------------


SETTINGS = [{}, {"temperature": 0.7, "top_k": 5}, {"top_p": 0.3}, {"min_p": 0.5, "temperature": 1.5},
            {"repetition_penalty": 1.8, "temperature": 0.6, "top_k": 40, "top_p": 0.8, "min_p": 0.05},
            {"temperature": 0.0, "top_k": 3}]


@pytest.mark.parametrize("settings", SETTINGS)
def test_filter_stages_end_exactly_where_one_process_logits_call_does(settings):
    """One filter per call, each on the previous scores == one call with every setting, bit for bit."""
    torch.manual_seed(0)
    logits, ids = torch.randn(300) * 3, [5, 7, 5, 9, 200]
    full = {**{k: v["off"] for k, v in explore.SETTINGS.items()}, **settings}
    stages = explore.filter_stages(logits, ids, full)
    assert [name for name, _ in stages] == ["model", "repetition", "temperature", "top-k", "top-p", "min-p"]
    assert torch.equal(stages[-1][1], infer.process_logits(logits[None], torch.tensor([ids]), **full)[0])


@pytest.mark.parametrize("settings", SETTINGS)
def test_next_token_bars_are_process_logits_of_the_models_logits(port, models, tokenizer, settings):
    answer = post(port, "/api/next", {"text": TEXT, "settings": settings, "seed": 3, "top": 30})
    ids = tokenizer.encode(TEXT)
    assert answer["ids"] == ids and answer["text"] == TEXT
    full = {**{k: v["off"] for k, v in explore.SETTINGS.items()}, **settings}
    with torch.no_grad():
        logits = models["final.ckpt"](torch.tensor([ids]))[:, -1]
    scores = infer.process_logits(logits, torch.tensor([ids]), **full)
    probs, model_probs = scores.softmax(-1)[0], logits.softmax(-1)[0]
    for row in answer["tokens"]:
        assert row["p"][0] == pytest.approx(float(model_probs[row["id"]]), rel=1e-4, abs=1e-7)
        assert row["p"][-1] == pytest.approx(float(probs[row["id"]]), rel=1e-4, abs=1e-7)
        assert (row["removed_by"] is None) == bool(torch.isfinite(scores[0, row["id"]]))
    ranked = [row["p"][1] for row in answer["tokens"][:30]]  # the order the filters cut
    assert ranked == sorted(ranked, reverse=True)
    assert answer["stages"][-1]["alive"] == int(torch.isfinite(scores).sum())
    entropy = float(torch.special.entr(probs).sum()) / math.log(2)
    assert answer["stages"][-1]["entropy_bits"] == pytest.approx(entropy, rel=1e-4, abs=1e-6)
    assert answer["greedy"] == int(scores.argmax())
    generator = torch.Generator().manual_seed(3)
    assert answer["sampled"] == int(infer.choose_tokens(scores, full["temperature"], [generator])[0])


def test_a_top_k_filter_keeps_k_tokens_and_says_what_it_kept(port):
    answer = post(port, "/api/next", {"text": TEXT, "settings": {"top_k": 5}})
    stages = {s["stage"]: s for s in answer["stages"]}
    assert stages["model"]["alive"] == stages["temperature"]["alive"] == 50257
    assert stages["top-k"]["alive"] == 5
    top5 = sum(row["p"][2] for row in answer["tokens"][:5])  # their probability before the cut
    assert stages["top-k"]["kept"] == pytest.approx(top5, rel=1e-4)
    assert [row["removed_by"] for row in answer["tokens"][4:6]] == [None, "top-k"]


def test_surprise_and_bits_per_byte_agree_with_eval_val_py_on_the_same_text(port, folder, tmp_path, tokenizer):
    answer = post(port, "/api/tokens", {"text": TEXT})
    ids = tokenizer.encode(TEXT)
    assert [t["id"] for t in answer["tokens"]] == ids and answer["end"]["id"] == tokenizer.eos_id
    assert answer["tokens"][0]["nll"] is None  # no context: not scored
    assert any("\ufffd" in t["piece"] for t in answer["tokens"])  # half of the emoji: no character alone...
    assert b"".join(bytes.fromhex(t["bytes"]) for t in answer["tokens"]) == TEXT.encode()  # ...but its exact bytes
    losses = [t["nll"] for t in answer["tokens"][1:]] + [answer["end"]["nll"]]
    assert sum(losses) / math.log(2) == pytest.approx(answer["bits"], rel=1e-5)
    (tmp_path / "text.txt").write_text(TEXT)
    result = run_script("eval_val.py", "--ckpt", folder / "final.ckpt", "--device", "cpu", "--json",
                        "--set", f"data.val_dataset={tmp_path / 'text.txt'}", "--set", "data.txt_documents=file",
                        "--set", f"training.seq_len={len(ids)}", "--set", "data.cache_dir=null")
    script = json.loads(result.stdout.strip().splitlines()[-1])
    assert (script["tokens"], script["bytes"]) == (answer["scored"], answer["bytes"]) == (len(ids), len(TEXT.encode()) - 3 + 1)
    assert answer["bpb"] == pytest.approx(script["val_bpb"], rel=1e-5)
    assert answer["loss"] == pytest.approx(script["val_loss"], rel=1e-5)


@pytest.mark.parametrize("name", ["final.ckpt", "swa.ckpt"])
def test_attention_weights_reproduce_each_layers_own_output(port, models, tokenizer, name):
    """weights @ V through o_proj == the attention output the model computed with SDPA, every layer and head."""
    model = models[name]
    config = model.config
    ids = tokenizer.encode(TEXT)
    T, groups = len(ids), config.n_heads // config.n_kv_heads
    seen = {}
    hooks = [block.attn.register_forward_hook(lambda m, args, out, layer=layer: seen.__setitem__(layer, (args[0], out)))
             for layer, block in enumerate(model.blocks)]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= i) & ((j > i - config.swa_window) if config.swa_window else True)
    for layer, block in enumerate(model.blocks):
        weights = torch.stack([torch.tensor(post(port, "/api/attention", {"ckpt": name, "ids": ids, "layer": layer,
                                                                          "head": head})["weights"])
                               for head in range(config.n_heads)])  # (n_heads, T, T)
        assert torch.all(weights[:, ~visible] == 0) and torch.all(weights[:, visible] > 0)
        x, out = seen[layer]
        with torch.no_grad():
            v = block.attn.v_proj(x).view(1, T, config.n_kv_heads, config.head_dim).transpose(1, 2)[0]
            y = weights @ v.repeat_interleave(groups, dim=0)  # (n_heads, T, head_dim): head h reads K/V head h // groups
            torch.testing.assert_close(block.attn.o_proj(y.transpose(0, 1).reshape(1, T, -1)), out)
    assert config.n_heads > config.n_kv_heads  # both models are GQA
    assert (config.swa_window == 4) == (name == "swa.ckpt") and T > 4  # the window's zeros are in the picture


def test_generation_streams_infer_generates_tokens(port, models, tokenizer):
    settings = {"temperature": 0.9, "top_k": 20}
    ids = tokenizer.encode("The cat")
    lines = stream(port, {"ids": ids, "settings": settings, "seed": 11, "max_new_tokens": 12})
    assert lines[-1]["done"] and lines[-1]["tokens"] == 12 and lines[-1]["reason"] in ("length", "eos")
    sampling = {**{k: v["off"] for k, v in explore.SETTINGS.items()}, **settings, "no_repeat_ngram_size": 0}
    steps = infer.generate(models["final.ckpt"], ids, 12, sampling, [torch.Generator().manual_seed(11)])
    expected = [int(tokens[0]) for tokens, _ in steps]
    got = [line["id"] for line in lines[:-1]]
    assert got == expected[:len(got)]
    assert "".join(line["text"] for line in lines) == tokenizer.decode([t for t in expected[:len(got)]])


def test_chat_wraps_the_question_in_infer_pys_template(port, models, tokenizer):
    lines = stream(port, {"instruction": "What is a token?", "settings": {"temperature": 0}, "max_new_tokens": 6})
    prompt = tokenizer.encode(format_instruction("What is a token?"))
    sampling = {**{k: v["off"] for k, v in explore.SETTINGS.items()}, "temperature": 0, "no_repeat_ngram_size": 0}
    expected = [int(t[0]) for t, _ in infer.generate(models["final.ckpt"], prompt, 6, sampling, [torch.Generator()])]
    assert [line["id"] for line in lines[:-1]] == expected[:len(lines) - 1]


# ---------------------------------------------------------------------------------------------
# Bad requests, concurrency, start-up and shutdown
# ---------------------------------------------------------------------------------------------


LONG = " ".join(["word"] * 40)  # 40 tokens: the tiny model's context is 32
BAD_REQUESTS = [  # (method, path, JSON body or raw bytes, extra headers, what the error must say)
    ("POST", "/api/next", b"{not json", {}, "not valid JSON"),
    ("POST", "/api/next", b"[1, 2]", {}, "must be a JSON object"),
    ("POST", "/api/next", b'{"settings": {"top_p": NaN}}', {}, "NaN is not a number"),
    ("POST", "/api/next", b"\xff\xfe", {}, "not valid JSON"),
    ("POST", "/api/nothing", {}, {}, "unknown endpoint POST /api/nothing"),
    ("GET", "/api/next", None, {}, "unknown endpoint GET /api/next"),
    ("DELETE", "/api/info", None, {}, "method DELETE is not supported"),
    ("POST", "/api/next", {"text": LONG}, {}, "longer than the model's context of 32"),
    ("POST", "/api/tokens", {"ids": list(range(33))}, {}, "longer than the model's context of 32"),
    ("POST", "/api/next", {"ids": [50257]}, {}, "token id 50257 is outside the vocabulary (0 to 50256)"),
    ("POST", "/api/attention", {"ids": [-1]}, {}, "token id -1 is outside the vocabulary"),
    ("POST", "/api/next", {"ids": []}, {}, "ids must be a non-empty list"),
    ("POST", "/api/next", {"ids": [1.5]}, {}, "ids must be a non-empty list"),
    ("POST", "/api/next", {"text": 5}, {}, "text must be a string"),
    ("POST", "/api/next", {"text": "a", "ids": [1]}, {}, "not both"),
    ("POST", "/api/next", {"settings": {"temperature": -1}}, {}, "settings.temperature must be a number from 0.0 to 3.0"),
    ("POST", "/api/next", {"settings": {"temperature": 1e-300}}, {}, "0 (greedy) or at least 0.01"),
    ("POST", "/api/next", {"settings": {"top_p": 0}}, {}, "settings.top_p must be a number from 0.01 to 1.0"),
    ("POST", "/api/next", {"settings": {"top_k": 2.5}}, {}, "settings.top_k must be an integer from 0 to 200"),
    ("POST", "/api/next", {"settings": {"top_k": True}}, {}, "settings.top_k must be an integer"),
    ("POST", "/api/next", {"settings": {"tempreature": 1}}, {}, "unknown field(s) tempreature"),
    ("POST", "/api/next", {"settings": [1]}, {}, "settings must be an object"),
    ("POST", "/api/next", {"top": 0}, {}, "top must be an integer from 1 to 100"),
    ("POST", "/api/next", {"seed": -1}, {}, "seed must be an integer"),
    ("POST", "/api/next", {"prompt": "hi"}, {}, "unknown field(s) prompt"),
    ("POST", "/api/next", {"ckpt": 99}, {}, "unknown checkpoint 99"),
    ("POST", "/api/next", {"ckpt": "../final.ckpt"}, {}, "unknown checkpoint '../final.ckpt'"),
    ("POST", "/api/next", {"ckpt": "/etc/passwd"}, {}, "unknown checkpoint"),
    ("POST", "/api/attention", {"text": "a b", "layer": 2}, {}, "layer must be an integer from 0 to 1"),
    ("POST", "/api/attention", {"text": "a b", "head": 4}, {}, "head must be an integer from 0 to 3"),
    ("POST", "/api/generate", {"max_new_tokens": 0}, {}, "max_new_tokens must be an integer from 1 to 500"),
    ("POST", "/api/generate", {"instruction": "  "}, {}, "instruction must be a non-empty string"),
    ("POST", "/api/generate", {"instruction": "hi", "text": "a"}, {}, "not both"),
    ("POST", "/api/next", {"text": "x" * 70000}, {}, "exceeds the limit of 65536 bytes"),
    ("POST", "/api/next", b'{"text": "a"}', {"Content-Type": "text/plain"}, "Content-Type: application/json"),
    ("POST", "/api/next", {}, {"Host": "attacker.example"}, "is not this loopback server"),
]


@pytest.mark.parametrize("method, path, body, headers, message", BAD_REQUESTS,
                         ids=[f"{r[0]} {r[1]} {r[4][:30]}" for r in BAD_REQUESTS])
def test_bad_request_gets_400_with_one_json_line_and_the_server_keeps_serving(port, method, path, body, headers, message):
    raw = body if isinstance(body, bytes) else None
    status, answer, _ = request(port, method, path, None if raw is not None else body, raw, headers)
    assert status == 400, answer
    assert message in answer["error"] and "\n" not in answer["error"], answer
    assert set(answer) == {"error"}
    assert request(port, "GET", "/api/info")[0] == 200


def test_concurrent_requests_get_the_same_answers_as_one_at_a_time(port):
    texts = [f"Number {i} of the test" for i in range(6)]
    calls = [("/api/next", {"text": t, "settings": {"top_k": 7}}) for t in texts]
    calls += [("/api/attention", {"text": t, "layer": 1, "head": 3}) for t in texts]
    calls += [("/api/tokens", {"text": t}) for t in texts]
    alone = [post(port, path, body) for path, body in calls]
    together = [None] * len(calls)

    def run(k):
        together[k] = post(port, *calls[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert together == alone


def test_bad_start_up_input_exits_2_with_one_line(folder, tmp_path, capsys):
    (tmp_path / "damaged.ckpt").write_bytes((folder / "final.ckpt").read_bytes()[:4096])
    for args, message in ([["--ckpt", tmp_path / "missing.ckpt", "--port", 0], "checkpoint not found"],
                          [["--ckpt", tmp_path / "damaged.ckpt", "--port", 0], "is not a readable checkpoint"],
                          [["--ckpt", folder / "final.ckpt", "--port", 70000], "--port must be from 0 to 65535"]):
        with pytest.raises(SystemExit) as stop:
            cli.run_cli(lambda: explore.main([str(a) for a in args]))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    with socket.socket() as busy:  # from the outside, as a user sees it: a port already taken
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = run_script("explore.py", "--ckpt", folder / "final.ckpt", "--port", taken, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: port {taken} is already in use on 127.0.0.1: "
                                                  "pick another with --port N (--port 0 takes any free port)"]


def test_host_flag_warns_and_ctrl_c_stops_cleanly(folder):
    process, port = start_server("--ckpt", folder / "final.ckpt", "--port", 0, "--host", "0.0.0.0")
    assert request(port, "GET", "/api/info", headers={"Host": "some-name:1"})[0] == 200  # no Host check off loopback
    time.sleep(0.2)
    code, err = stop_server(process)
    assert "warning: listening on 0.0.0.0: anyone who can reach port" in err
    assert code == 0 and "Traceback" not in err and "stopped" in err


def test_sampling_ranges_are_ones_infer_py_accepts():
    """The page's slider ranges (explore.SETTINGS) stay inside infer.py's own rules (infer.check_args)."""
    for key, rule in explore.SETTINGS.items():
        for value in (rule["low"], rule["high"], rule["off"]):
            settings = {**{k: r["off"] for k, r in explore.SETTINGS.items()}, key: value}
            infer.check_args(argparse.Namespace(**settings, no_repeat_ngram_size=0, max_new_tokens=1, num_samples=1, seed=None,
                                                prompt="", interactive=False, info_only=False))


def test_every_start_up_message_is_documented():
    text = (ROOT / "docs" / "TROUBLESHOOTING.md").read_text()
    for fragment in ["is already in use on", "cannot listen on", "--port must be from 0 to 65535",
                     "--threads must be at least 1", "is left out of the checkpoint list"]:
        assert fragment in text, fragment

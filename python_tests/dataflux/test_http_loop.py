"""The full closed loop against a local OpenAI-compatible server (real sockets on 127.0.0.1) with injected
timeouts, HTTP 500s, connection resets and malformed model output: nothing lost, every failure accounted for."""
import json
import os
from collections import Counter


from mock_openai import MockOpenAIServer, http_roles

from eureka_fast.dataflux.runner import load_config, run_dataflux
from eureka_fast.dataflux.schemas import parse_question, parse_trace
from eureka_fast.dataflux.store import RunStore

KINDS = {"http_500": "http_5xx", "timeout": "timeout", "malformed": "malformed", "reset": "connection"}


def _config(base_url, **pipeline):
    cfg = load_config(None, {"shard_size": 2, "workers": 3, **pipeline})
    cfg["roles"] = http_roles(base_url, timeout_s=2.0)
    return cfg


def _read(out):
    store = RunStore(out)
    store.manifest = json.load(open(os.path.join(out, "manifest.json")))
    return store, store.records("data"), store.records("rejected"), store.read_jsonl("clips.jsonl")


def test_http_loop_with_faults_accounts_for_everything(tiny_audio_dir, tmp_path):
    out = str(tmp_path / "out")
    with MockOpenAIServer(every_500=7, every_timeout=17, every_malformed=5, every_reset=13, delay_s=2.6) as srv:
        cfg = _config(srv.base_url, categories=["speaker_gender", "pitch_level", "spoken_word", "clip_duration"])
        stats = run_dataflux(tiny_audio_dir, out, cfg, progress=False, log=lambda m: None)
        injected = dict(srv.injected)
    store, kept, rejected, clips = _read(out)

    # every clip accounted for exactly once; the unreadable one with a reason
    files = sorted(os.listdir(tiny_audio_dir))
    assert len(clips) == len(files) == 4 and len({c["id"] for c in clips}) == 4
    broken = [c for c in clips if c["audio"].endswith("zz-broken.wav")]
    assert broken[0]["status"] == "failed" and broken[0]["reason"] == "unreadable_audio"
    assert stats["clips"]["failed_by_reason"] == {"unreadable_audio": 1}

    # every fault the server injected shows up in the client's event counters, kind by kind
    events = Counter()
    for c in clips:
        for k, v in c["events"].items():
            events[k.split(".", 1)[1]] += v
    assert all(injected.get(k, 0) > 0 for k in KINDS), injected  # the schedule really exercised every kind
    for server_kind, client_kind in KINDS.items():
        if server_kind == "timeout":
            # on a loaded machine an ordinary reply can also miss the deadline: the client saw at least those
            assert events[client_kind] >= injected.get(server_kind, 0), (server_kind, events, injected)
        else:
            assert events[client_kind] == injected.get(server_kind, 0), (server_kind, events, injected)

    # no record lost or duplicated; every rejection has a reason
    ids = [r["id"] for r in kept] + [r["id"] for r in rejected]
    assert len(ids) == len(set(ids))
    assert all(r.get("reason") for r in rejected)
    n_cats = len(stats["categories"])
    ok_clips = [c["id"] for c in clips if c["status"] == "ok"]
    for cid in ok_clips:
        for cat in stats["categories"]:
            unit_kept = [r for r in kept if r["meta"]["clip_id"] == cid and r["meta"]["category_id"] == cat]
            unit_rej = [r for r in rejected if r.get("clip_id") == cid and r.get("category_id") == cat]
            assert len(unit_kept) <= 5
            assert unit_kept or unit_rej, (cid, cat)  # a unit never vanishes
    assert n_cats == 4

    # the per-category stats add up to the records on disk
    gen = sum(c["generated"] for c in stats["categories"].values())
    assert gen == len(kept) + sum(1 for r in rejected if r.get("stage") not in ("clip", "generate"))
    assert stats["questions"]["kept"] == len(kept) > 0

    # kept records follow the conversation format, with provenance, and hard examples are flagged
    for r in kept:
        sys_msg, user, asst = r["messages"]
        assert sys_msg["role"] == "system" and user["role"] == "user" and asst["role"] == "assistant"
        assert user["content"][0]["type"] == "audio_url" and os.path.isabs(user["content"][0]["audio_url"]["url"])
        parse_question(user["content"][1]["text"])
        assert parse_trace(asst["content"][0]["text"])[1] == r["answer"]
        assert r["meta"]["backends"]["judge"].startswith("openai:mock-judge")
        a, b = r["meta"]["answers"]["A"], r["meta"]["answers"]["B"]
        assert r["meta"]["hard"] == bool(a and b and a != b)
    assert any(r["meta"]["hard"] for r in kept)  # B disagrees with A on ~1/4 and the judge keeps some
    # discarded questions were regenerated in later rounds
    assert any(r["meta"]["round"] > 1 for r in kept)
    assert any(r["reason"].startswith("judge_discard") for r in rejected)


def test_unreachable_server_records_every_clip(tiny_audio_dir, tmp_path):
    # nothing listens on this port: every clip fails at the captioner with a connection reason, none is lost
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = load_config(None, {"shard_size": 10})
    cfg["roles"] = http_roles(f"http://127.0.0.1:{port}/v1", max_retries=1)
    stats = run_dataflux(tiny_audio_dir, str(tmp_path / "out"), cfg, progress=False, log=lambda m: None)
    assert stats["clips"]["total"] == 4 and stats["clips"]["ok"] == 0
    assert stats["clips"]["failed_by_reason"] == {"captioner_connection": 3, "unreadable_audio": 1}

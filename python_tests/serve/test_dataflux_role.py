"""DataFlux with `answerer_a` pointed at a running `eureka-audio serve` (end to end, both as processes)."""
import json
import os
import subprocess
import sys

import httpx
import pytest
import yaml

from eureka_fast.dataflux import synthetic

from test_serve_cli import ROOT, ServeProcess

needs_espeak = pytest.mark.skipif(not synthetic.espeak_available(), reason="espeak-ng not installed")


@needs_espeak
def test_dataflux_run_with_answerer_a_on_the_server(serve_model_dir, tmp_path):
    clips = [synthetic.make_clip(i, voice, 60, 135, None) for i, voice in enumerate(("m3", "f3"))]
    audio_dir = tmp_path / "clips"
    synthetic.write_clips(clips, audio_dir)
    with ServeProcess("--model", serve_model_dir, "--served-model-name", "eureka-tiny") as server:
        url = server.wait_ready()
        roles = {"answerer_a": {"backend": "openai", "base_url": url + "/v1", "model": "eureka-tiny",
                                "timeout_s": 120, "max_retries": 0, "max_tokens": 16, "temperature": 0.0,
                                "concurrency": 4}}
        config = tmp_path / "roles.yaml"
        config.write_text(yaml.safe_dump({"roles": roles, "pipeline": {"rounds": 1}}))
        out = tmp_path / "out"
        run = subprocess.run([sys.executable, "-m", "eureka_fast.cli", "dataflux", "run", "--audio-dir",
                              str(audio_dir), "--out", str(out), "--config", str(config), "--categories",
                              "clip_duration", "--questions", "2"],
                             capture_output=True, text=True, timeout=600, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
        metrics = httpx.get(url + "/metrics", timeout=10).text
    assert run.returncode == 0, run.stderr[-3000:]
    records = []
    for folder in ("data", "rejected"):
        for root, _, files in os.walk(out / folder):
            for name in files:
                if name.endswith(".jsonl"):
                    with open(os.path.join(root, name)) as fh:
                        records += [json.loads(line) for line in fh if line.strip()]
    # kept training records carry the backends in "meta", rejected ones at the top level
    with_backends = [r.get("meta", r) for r in records if "backends" in r.get("meta", r)]
    assert with_backends, records[:3]
    assert all(r["backends"]["answerer_a"] == f"openai:eureka-tiny@{url}/v1/chat/completions"
               for r in with_backends)
    # the server really answered them: each question carried the clip's audio (pads counted in the prompt tokens)
    served = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith(("eureka_serve_prompt_tokens_total ", "eureka_serve_generation_tokens_total "))}
    questions = len(with_backends)
    assert served["eureka_serve_generation_tokens_total"] >= 1
    assert served["eureka_serve_prompt_tokens_total"] > 20 * questions  # > 1.6 s of audio tokens each

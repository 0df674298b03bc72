"""The Triton kernels compile for an H100/H200 (sm_90a) and fit one SM's shared memory, in every tile
configuration family the planner can pick (bf16 and fp32), with wide items, and the fused glue kernels in
bf16/fp16/fp32: errors the CPU interpreter cannot show. Runs benchmarks/compile_check.py --json in a
process without TRITON_INTERPRET (compiling needs no GPU: triton.compile with an explicit target)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SHARED_MEMORY_LIMIT = 227 * 1024  # per thread block on sm_90


@pytest.fixture(scope="module")
def reports():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"), "--json"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_configuration_compiles_for_sm90(reports):
    # planner families: head_dim 64 (3 families x bf16, fp32), 128 (3, bf16), 256 (1, bf16), the third family of 64 and
    # 128 being the TMA tiles (64 x 64 keys, 3 stages: prefill, and decode since session 13); prefill with page ids
    # prefetched (1); decode with 64-row packed tiles (prefix packs at GQA >= 8, 1); wide x 2; fused 3 x 3
    assert len(reports) == 6 + 3 + 1 + 1 + 1 + 2 + 9
    failed = [r for r in reports if "error" in r]
    assert not failed, failed


def test_every_configuration_fits_one_sms_shared_memory(reports):
    too_big = [r for r in reports if r.get("shared", 0) > SHARED_MEMORY_LIMIT]
    assert not too_big, too_big

"""`make soak`: every bad-input class, every injection and every fault of tests/soak, against a real
tritonserver, the HTTP API and the real tools; prints the counts (issue 14 item 7). Not collected by
`make test` (no test_ prefix); tests/soak/test_quick.py is its quick subset there.

    python -m pytest -q -s tests/soak/soak_all.py
"""

from __future__ import annotations

import signal

import pytest

from tests.soak import cases as C
from tests.soak import faults as F
from tests.train.traindata import steer_rows, write_conversations

COUNTS: dict[str, object] = {}


def test_bad_inputs(urls, tiny_model):
    cases = C.all_bad_inputs()
    tally = C.run_bad_inputs(urls, cases, C.server_paths(tiny_model))
    for d in tally.details:
        print("  ", " | ".join(d))
    by_channel = {ch: sum(c.channel == ch for c in cases) for ch in dict.fromkeys(c.channel for c in cases)}
    COUNTS.update({
        "bad-input classes tried": f"{len(cases)} ({', '.join(f'{k} {v}' for k, v in by_channel.items())})",
        "rejected with the field named": tally.outcomes[C.NAMED],
        "answered by Triton's parser": tally.outcomes[C.PARSER],
        "rejected, field not named": tally.outcomes[C.UNNAMED],
        "accepted silently": tally.outcomes[C.ACCEPTED],
        "server stopped answering": tally.outcomes[C.DEAD],
        "stack traces or paths leaked": tally.outcomes[C.LEAK],
    })
    assert tally.outcomes[C.LEAK] == 0 and tally.outcomes[C.DEAD] == 0


def test_injections(urls, tiny_model):
    tally = C.run_injections(urls, tiny_model, C.injections())
    C.run_nemo_injections(urls, C.SPELLINGS, tally)
    for d in tally.details:
        print("  ", d)
    COUNTS.update({"injection cases": f"{tally.cases} ({tally.refused} refused)",
                   "smuggled control tokens": tally.smuggled})
    assert tally.smuggled == 0 and tally.mismatched == 0


FAULTS: list[F.FaultResult] = []


@pytest.mark.parametrize("fault", ["serve SIGTERM", "serve SIGINT", "conversion", "generator", "sft"])
def test_fault(fault, tiny_model, tmp_path):
    if fault == "serve SIGTERM":
        result = F.kill_serve_during_start_up(tiny_model, signal.SIGTERM)
    elif fault == "serve SIGINT":
        result = F.kill_serve_during_start_up(tiny_model, signal.SIGINT)
    elif fault == "conversion":
        result = F.kill_conversion_mid_write(tiny_model, tmp_path)
    elif fault == "generator":
        result = F.kill_generator_mid_load(tiny_model)
    else:
        data = write_conversations(tmp_path / "data.jsonl", steer_rows(24))
        result = F.kill_sft_after_checkpoint(tiny_model, data, tmp_path)
    print(f"   {result.fault}: injected {result.injected}, lost {result.lost}; {result.note}")
    FAULTS.append(result)
    assert result.injected and result.lost == 0, result


def test_print_counts():
    COUNTS.update({"faults injected": f"{sum(f.injected for f in FAULTS)} of {len(FAULTS)}",
                   "items lost": sum(f.lost for f in FAULTS)})
    print("\nsoak counts\n" + C.table(list(COUNTS.items())))
    assert COUNTS.get("stack traces or paths leaked") == 0 and COUNTS.get("smuggled control tokens") == 0
    assert COUNTS["items lost"] == 0

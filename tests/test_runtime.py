"""The runtime shared by the pipeline and the service: bounded micro-batches, pooling, length limits."""

from __future__ import annotations

import numpy as np
import pytest

from serve.config import SessionSettings
from serve.runtime import InputTooLong, ModelRuntime, pool
from tests.conftest import TinyRun


def test_micro_batches_respect_the_token_budget() -> None:
    runtime = ModelRuntime.__new__(ModelRuntime)
    runtime.max_tokens_per_run, runtime.max_batch = 256, 8
    lengths = [5, 128, 64, 7, 100, 3, 128, 20, 20, 20, 20, 20, 20, 20, 20]
    groups = list(runtime.micro_batches(lengths))
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) * max(lengths[i] for i in group) <= 256
        assert len(group) <= 8


def test_pooling_modes_ignore_padding() -> None:
    hidden = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(pool(hidden, mask, "mean"), [[2.0, 3.0]])
    np.testing.assert_allclose(pool(hidden, mask, "cls"), [[1.0, 2.0]])
    np.testing.assert_allclose(pool(hidden, mask, "max"), [[3.0, 4.0]])
    np.testing.assert_allclose(pool(hidden, mask, "mean_sqrt_len"), [[4.0 / np.sqrt(2), 6.0 / np.sqrt(2)]])


def test_outputs_do_not_depend_on_batch_company(tiny_run: TinyRun) -> None:
    from serve.artifacts import load_approved

    folder = load_approved(tiny_run.artifacts / "tiny-embed").folder
    runtime = ModelRuntime(folder, SessionSettings(), max_seq_len=64, max_tokens_per_run=256, max_batch=8)
    texts = ["short", "a somewhat longer sentence about a film that was fine", "ok"] * 5
    together = runtime.embed(texts)
    alone = np.stack([runtime.embed([t])[0] for t in texts])
    # Dynamic int8 picks activation scales per run, so company moves results slightly, never more.
    np.testing.assert_allclose(together, alone, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_many_texts_run_shortest_first_come_back_in_their_own_order(tiny_run: TinyRun) -> None:
    from pipeline import inference
    from serve.artifacts import load_approved

    folder = load_approved(tiny_run.artifacts / "tiny-embed").folder
    runtime = ModelRuntime(folder, SessionSettings(), max_seq_len=64, max_tokens_per_run=256, max_batch=8)
    rng = np.random.default_rng(0)
    words = ["film", "quiet", "memory", "sequel", "worst", "funny", "long", "fine"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(2 * inference.CHUNK + 17)]
    together = inference.outputs(runtime, texts, "texts")
    alone = np.stack([runtime.embed([text])[0] for text in texts])
    assert together.shape == alone.shape
    np.testing.assert_allclose(together, alone, atol=1e-3)  # as above: company moves int8 slightly


def test_too_long_input_is_reported_not_truncated(tiny_run: TinyRun) -> None:
    from serve.artifacts import load_approved

    folder = load_approved(tiny_run.artifacts / "tiny-embed").folder
    runtime = ModelRuntime(folder, SessionSettings(), max_seq_len=16, max_tokens_per_run=64)
    with pytest.raises(InputTooLong) as caught:
        runtime.token_ids(["fine", "word " * 40], truncate=False)
    assert caught.value.index == 1 and caught.value.limit_name == "max_seq_len" and caught.value.size > 16
    assert len(runtime.token_ids(["word " * 40])[0]) == 16


def test_inputs_are_cut_or_refused_on_characters_before_tokenizing(tiny_run: TinyRun) -> None:
    """The character window is max_seq_len × (longest vocabulary piece + 1): a million characters are
    refused at once without truncation, cut to the window with it, and the cut never changes a result."""
    from serve.artifacts import load_approved

    folder = load_approved(tiny_run.artifacts / "tiny-embed").folder
    runtime = ModelRuntime(folder, SessionSettings(), max_seq_len=16, max_tokens_per_run=64, max_batch=4)
    longest = max(len(piece.removeprefix("##")) for piece in runtime.tokenizer.get_vocab())
    assert runtime.max_input_chars == 16 * (longest + 1)
    assert runtime.max_request_chars == 4 * runtime.max_input_chars
    bomb = "!" * 1_000_000
    with pytest.raises(InputTooLong) as caught:
        runtime.token_ids(["fine", bomb], truncate=False)
    assert (caught.value.index, caught.value.limit_name, caught.value.size) == (1, "max_input_chars", 1_000_000)
    assert runtime.bound([bomb])[0] == "!" * runtime.max_input_chars
    long_words = " ".join(["telecommunications"] * 200)
    assert runtime.token_ids([long_words])[0] == runtime.tokenizer.encode(long_words).ids
    assert ModelRuntime(folder, SessionSettings(), 16, 64, max_batch=4, max_request_chars=10).max_request_chars == 10

"""Accept a model folder only if it is safe to load and memfit serves it (pipeline/model_folder.py)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from pipeline.config import SourceConfig
from pipeline.model_folder import ModelFolderError, inspect_folder
from pipeline.sources import model_folder
from pipeline.state import BuildContext, BuildState, SourceModel
from serve.artifacts import sha256_file
from serve.config import ConfigError


@dataclass(frozen=True)
class LoadStage:
    source: SourceConfig
    name: str = "load"

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        cache = context.work_dir.parent / "sources"
        folder, described = model_folder(self.source, context.config_path, cache, state.dataset)
        facts = inspect_folder(folder)
        if context.model.task == "text-classification" and facts.task != "text-classification":
            raise ModelFolderError(
                f"{folder}: task text-classification needs a *ForSequenceClassification model; this one embeds"
            )
        digest = hashlib.sha256()
        for path in facts.weights:
            digest.update(sha256_file(path).encode())
        pooling = facts.pooling
        if context.model.task == "feature-extraction" and pooling is None:
            pooling = "mean"
        limit = context.service.limits.max_seq_len
        if limit > facts.max_seq_len:
            raise ConfigError(
                f"{context.service_path}: field 'limits.max_seq_len': {limit} is more than the {facts.max_seq_len} "
                f"tokens {context.model.name} accepts"
            )
        weights = [p.name for p in facts.weights]
        source = {**described, "weights_sha256": digest.hexdigest(), "weights": weights}
        return replace(
            state,
            source=SourceModel(
                folder=folder,
                weights_sha256=digest.hexdigest(),
                source=source,
                pooling=pooling,
                normalize=facts.normalize,
                labels=facts.labels if context.model.task == "text-classification" else (),
                is_sentence_transformer=facts.is_sentence_transformer,
                model_type=facts.model_type,
                max_positions=facts.max_positions,
            ),
        )

"""Pretraining: next-token loss under the configured objective mixture, on packed rows."""
from __future__ import annotations

from jaxlm import model
from jaxlm.config import Config, ConfigError
from jaxlm.objectives import lm_loss
from jaxlm.objectives.lm import chunked_lm_loss
from jaxlm.train.loop import Stage, run


def lm_loss_fn(model_cfg, loss_chunk: int = 0):
    """loss_fn(params, batch) -> (summed NLL, metrics) for batches of tokens/targets/loss_mask.

    loss_chunk > 0: the output projection and cross-entropy run `loss_chunk` positions at a
    time (`chunked_lm_loss`), so the [B, T, V] float32 logits never exist at once.
    """

    def loss_fn(params, batch):
        args = (batch["tokens"], batch.get("segment_ids"), batch.get("positions"), batch.get("prefix_len"))
        if loss_chunk:
            x_BTD = model.hidden(model_cfg, params, *args, prefix_mask=batch.get("prefix_mask"))
            _, metrics = chunked_lm_loss(x_BTD, model.head_kernel(model_cfg, params), batch["targets"],
                                         batch["loss_mask"], loss_chunk)
        else:
            logits = model.apply(model_cfg, params, *args, prefix_mask=batch.get("prefix_mask"))
            _, metrics = lm_loss(logits, batch["targets"], batch["loss_mask"])
        return metrics["loss_sum"], metrics

    return loss_fn


def token_count(batch):
    return batch["loss_mask"].sum()


def build(cfg: Config) -> Stage:
    from jaxlm.data.pipeline import build_lm_data

    train, heldout, info = build_lm_data(cfg.data, cfg.train.seq_len, batch_size=cfg.train.batch_size,
                                         batch_ramp=cfg.train.batch_ramp_start > 0)
    if info["vocab_size"] > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({info['vocab_size']})")
    return Stage("pretrain", lm_loss_fn(cfg.model, cfg.train.loss_chunk), token_count, train, heldout, info)


def main(cfg: Config) -> dict:
    """Run pretraining; the summary adds the corpus's unigram entropy, the loss to beat."""
    stage = build(cfg)
    summary = run(cfg, stage)
    summary["unigram_entropy_nats"] = stage.info["unigram_entropy_nats"]
    return summary

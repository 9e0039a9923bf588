"""Pretraining: one trained role (the policy), next-token loss under the configured objective
mixture, on packed rows."""
from __future__ import annotations

from jaxlm import model
from jaxlm.config import Config, ConfigError
from jaxlm.objectives import lm_loss
from jaxlm.objectives.lm import chunked_lm_loss
from jaxlm.train.loop import Stage, run
from jaxlm.train.state import Role
from jaxlm.train.step import Objective


def token_count(batch):
    """The loss is the mean over target tokens: their count in the whole batch."""
    return batch["loss_mask"].sum()


def lm_objective(model_cfg, loss_chunk: int = 0) -> Objective:
    """The policy's summed next-token NLL over `loss_mask`, on batches of tokens/targets/loss_mask
    (and segment_ids, positions, prefix_len or prefix_mask where packed); metrics loss, accuracy.
    An encoder-decoder's rows add the encoder's side: encoder_tokens, encoder_segment_ids and
    encoder_positions (`jaxlm.data.examples.encdec`).

    loss_chunk > 0: the output projection and cross-entropy run `loss_chunk` positions at a
    time (`chunked_lm_loss`), so the [B, T, V] float32 logits never exist at once.
    """

    def loss(params, frozen, batch):
        del frozen
        p = params["policy"]
        args = (batch["tokens"], batch.get("segment_ids"), batch.get("positions"), batch.get("prefix_len"))
        if model_cfg.arch == "encoder_decoder":  # rows of `jaxlm.data.examples.encdec`
            logits = model.apply(model_cfg, p, batch["encoder_tokens"], batch["encoder_segment_ids"],
                                 batch["encoder_positions"], decoder_tokens=batch["tokens"],
                                 decoder_segment_ids=batch["segment_ids"], decoder_positions=batch["positions"])
            _, metrics = lm_loss(logits, batch["targets"], batch["loss_mask"])
        elif loss_chunk:
            x_BTD = model.hidden(model_cfg, p, *args, prefix_mask=batch.get("prefix_mask"))
            _, metrics = chunked_lm_loss(x_BTD, model.head_kernel(model_cfg, p), batch["targets"],
                                         batch["loss_mask"], loss_chunk)
        else:
            logits = model.apply(model_cfg, p, *args, prefix_mask=batch.get("prefix_mask"))
            _, metrics = lm_loss(logits, batch["targets"], batch["loss_mask"])
        return metrics["loss"][0], metrics

    return Objective(loss, token_count)


def policy_role(cfg: Config) -> tuple[Role, ...]:
    """The one trained role of pretraining and SFT: the config's model, from train.init_from if set."""
    return (Role("policy", cfg.model, init_from=cfg.train.init_from),)


def build(cfg: Config) -> Stage:
    from jaxlm.data.pipeline import build_lm_data

    train, heldout, info = build_lm_data(cfg.data, cfg.train.seq_len, batch_size=cfg.train.batch_size,
                                         batch_ramp=cfg.train.batch_ramp_start > 0, arch=cfg.model.arch)
    if info["vocab_size"] > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({info['vocab_size']})")
    return Stage("pretrain", policy_role(cfg), lm_objective(cfg.model, cfg.train.loss_chunk), train, heldout, info)


def main(cfg: Config) -> dict:
    """Run pretraining; the summary adds the corpus's unigram entropy, the loss to beat."""
    stage = build(cfg)
    summary = run(cfg, stage)
    summary["unigram_entropy_nats"] = stage.info["unigram_entropy_nats"]
    return summary

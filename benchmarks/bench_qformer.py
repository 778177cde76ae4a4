"""Stage-1 training step (forward + backward + AdamW) in samples/s, four contenders interleaved in one process:

- ours: `SmolVLMQFormerForImageTextRetrieval` with ITC on given image features (197 x 768);
- BLIP-2: transformers' `Blip2QFormerModel` built to the same size (6 layers, 768 wide, 12 heads, FFN 3072,
  cross-attention every 2nd layer, 32 queries, SDPA) with the ITC head of `Blip2ForImageTextRetrieval`, the same
  inputs and the same loss;
- ours reading a real feature cache on disk (`build_feature_cache` once, `FeatureCache.get` every step);
- ours running the frozen ViT-B/16 on (already preprocessed) pixels every step.

    python benchmarks/bench_qformer.py [--quick] [--json out.json]
"""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from common import (
    interleaved_medians,
    parse_args,
    print_table,
    random_images,
    reference_config,
    stage1_text,
    step_flops,
    training_step,
    write_json,
)
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, ViTImageProcessor
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from smolvlm_qformer import SmolVLMQFormerConfig, SmolVLMQFormerForImageTextRetrieval
from smolvlm_qformer.data import build_feature_cache
from smolvlm_qformer.modeling_smolvlm_qformer import contrastive_loss


class Blip2QFormerITC(nn.Module):
    """BLIP-2's ITC as `Blip2ForImageTextRetrieval(use_image_text_matching_head=False)` computes it (query path
    cross-attending to the image, text path through the same Q-Former, projections, max over queries), with a
    learnable temperature and the same symmetric contrastive loss as ours."""

    def __init__(self, config: SmolVLMQFormerConfig):
        super().__init__()
        q = config.qformer_config
        blip2_config = Blip2QFormerConfig(
            vocab_size=q.vocab_size,
            hidden_size=q.dim,
            num_hidden_layers=q.n_layers,
            num_attention_heads=q.n_heads,
            intermediate_size=q.hidden_dim,
            hidden_dropout_prob=q.dropout,
            attention_probs_dropout_prob=q.attention_dropout,
            max_position_embeddings=q.max_position_embeddings,
            cross_attention_frequency=q.cross_attention_frequency,
            encoder_hidden_size=q.encoder_hidden_size,
            use_qformer_text_input=True,  # the text path needs the text feed-forward blocks
        )
        blip2_config._attn_implementation = "sdpa"
        self.query_tokens = nn.Parameter(torch.randn(1, q.num_query_tokens, q.dim) * q.initializer_range)
        self.embeddings = Blip2TextEmbeddings(blip2_config)
        self.qformer = Blip2QFormerModel(blip2_config)
        self.vision_projection = nn.Linear(q.dim, q.embed_dim)
        self.text_projection = nn.Linear(q.dim, q.embed_dim)
        self.temperature = nn.Parameter(torch.tensor(q.itc_temperature))

    def forward(
        self, vision_hidden_states: torch.Tensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor
    ) -> SimpleNamespace:
        query_tokens = self.query_tokens.expand(vision_hidden_states.shape[0], -1, -1)
        image_attention_mask = torch.ones(
            vision_hidden_states.shape[:-1], dtype=torch.long, device=vision_hidden_states.device
        )
        query_output = self.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=vision_hidden_states,
            encoder_attention_mask=image_attention_mask,
        ).last_hidden_state
        text_output = self.qformer(
            query_embeds=self.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
        ).last_hidden_state
        image_feats = F.normalize(self.vision_projection(query_output), dim=-1)
        text_feats = F.normalize(self.text_projection(text_output[:, 0, :]), dim=-1)
        return SimpleNamespace(loss=contrastive_loss(image_feats, text_feats, self.temperature.clamp(0.001, 0.5)))


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(__doc__.splitlines()[0], argv)
    batch = 4 if args.tiny else 8 if args.quick else 32
    steps = 2 if args.quick else 5
    caption_tokens = 32
    torch.manual_seed(0)
    config = reference_config(args.tiny)
    size = config.vision_config.image_size
    image_processor = ViTImageProcessor(size={"height": size, "width": size})
    images = random_images(size, batch)
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
    text = stage1_text(config, batch, caption_tokens)

    ours = SmolVLMQFormerForImageTextRetrieval(config)
    blip2 = Blip2QFormerITC(config)
    with tempfile.TemporaryDirectory() as folder:
        cache = build_feature_cache(ours.vision_model, image_processor, [{"image": image} for image in images], folder)
        vision_hidden_states = cache.get(range(batch))[0].float()
        contenders = {
            "ours, ITC": training_step(ours, {"vision_hidden_states": vision_hidden_states, **text}),
            "BLIP-2 Q-Former, ITC": training_step(blip2, {"vision_hidden_states": vision_hidden_states, **text}),
            "ours, feature cache": training_step(
                ours, lambda: {"vision_hidden_states": cache.get(range(batch))[0], **text}
            ),
            "ours, ViT on pixels": training_step(ours, {"pixel_values": pixel_values, **text}),
        }
        flops = {name: step_flops(contenders[name]) for name in ("ours, ITC", "BLIP-2 Q-Former, ITC")}
        seconds = interleaved_medians(contenders, steps)
    throughput = {name: batch / s for name, s in seconds.items()}
    figures = {
        "samples_per_s": throughput,
        "ratio_vs_blip2_qformer": throughput["ours, ITC"] / throughput["BLIP-2 Q-Former, ITC"],
        "ratio_cache_vs_pixels": throughput["ours, feature cache"] / throughput["ours, ViT on pixels"],
        "gflops_per_step": {name: f / 1e9 for name, f in flops.items()},
        "batch_size": batch,
    }
    print_table(
        f"Stage-1 training step, batch {batch}, captions of {caption_tokens} tokens (median of {steps})",
        ["contender", "s/step", "samples/s", "GFLOP/step"],
        [[name, s, throughput[name], flops.get(name, 0) / 1e9 or "-"] for name, s in seconds.items()],
        [
            f"ours / BLIP-2: {figures['ratio_vs_blip2_qformer']:.2f}x (goal >= 1.2x); "
            f"cache / pixels: {figures['ratio_cache_vs_pixels']:.2f}x (goal >= 3x)"
        ],
    )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()

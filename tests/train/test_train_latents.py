"""Stage 2 trains on pre-encoded latents: the loss must equal the generator's own diffusion loss."""

from __future__ import annotations

import torch


def test_latent_loss_equals_the_generators_diffusion_loss_on_features():
    import reactdiff
    from pipeline.train_loop import latent_diffusion_loss

    torch.manual_seed(0)
    gen = reactdiff.build_generator("small", seq_len=100, model_channels=16, hidden_dim=32, feature_dim=16,
                                    cond_dim=32).eval()
    speaker = {n: torch.randn(3, 100, w) for n, w in gen.feature_widths.items()}
    listener = {n: torch.randn(3, 100, w) for n, w in gen.feature_widths.items()}
    with torch.no_grad():
        gen.update_statistics(speaker)
        gen.update_statistics(listener)
        z_s, z_l = gen.encode(speaker), gen.encode(listener)
    ours, ours_parts = latent_diffusion_loss(gen, z_s, z_l, generator=torch.Generator().manual_seed(5))
    ref, ref_parts = gen.diffusion_loss(speaker, listener, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, ref)
    assert ours_parts.keys() == ref_parts.keys()
    ours.backward()                        # gradients reach the trainable stage-2 modules
    assert all(p.grad is not None for p in gen.cond.parameters())

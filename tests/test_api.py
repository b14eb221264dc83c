"""The Python API as the README shows it: a hand-written loop over BYOL, LARS and the schedules."""
import torch

from byol import BYOL, LARS, MLPHead, cosine_tau, param_groups, resnet, scaled_lr, warmup_cosine_lr


def test_readme_loop_trains_online_and_moves_target():
    torch.manual_seed(0)
    encoder = resnet("resnet18", width=0.125, cifar_stem=True)
    model = BYOL(encoder, feature_dim=encoder.feature_dim, projector=MLPHead(encoder.feature_dim, 32, 16),
                 predictor=MLPHead(16, 32, 16))
    opt = LARS(param_groups(model, weight_decay=1.5e-6), lr=0.0)
    online0 = [p.detach().clone() for p in model.online_parameters()]
    target0 = [p.detach().clone() for p in model.target_parameters()]
    x = torch.rand(16, 3, 16, 16)
    total, losses = 6, []
    for step in range(total):
        view1 = x + 0.1 * torch.randn_like(x)
        view2 = x + 0.1 * torch.randn_like(x)
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, total, 1, scaled_lr(2.0, 16))
        out = model(view1, view2)
        loss = out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target(cosine_tau(step, total, 0.9))
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, p) for a, p in zip(online0, model.online_parameters()) if a.dim() > 1)
    assert any(not torch.equal(a, p) for a, p in zip(target0, model.target_parameters()))
    # the target moved towards the online network
    d0 = sum((a - b).pow(2).sum() for a, b in zip(target0, model.online_parameters()))
    d1 = sum((a - b).pow(2).sum() for a, b in zip(model.target_parameters(), model.online_parameters()))
    assert d1 < d0

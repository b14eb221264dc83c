"""One training step: the EMA uses the online weights *after* the optimizer step (docs/method.md §1)."""
import torch

from byol.models import BYOL, MLPHead, resnet
from byol.optim import build_optimizer, excluded_from_decay_and_adaptation
from byol.train.step import train_step


def _model():
    torch.manual_seed(0)
    enc = resnet("resnet18", width=0.125, cifar_stem=True)
    projector = MLPHead(enc.feature_dim, 32, 16)
    return BYOL(enc, enc.feature_dim, projector=projector, predictor=MLPHead(16, 32, 16))


def test_target_follows_the_updated_online_weights():
    model = _model()
    opt = build_optimizer("lars", model, lr=0.0, weight_decay=1e-5)
    xi0 = [p.detach().clone() for p in model.target_parameters()]
    theta0 = [p.detach().clone() for p in model.online_parameters()]
    x = torch.randn(8, 3, 16, 16)
    train_step(model, opt, x, x.flip(-1), lr=0.5, tau=0.9)
    theta1 = [p.detach() for p in model.online_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(theta0, theta1))
    for x0, t1, got in zip(xi0, theta1, model.target_parameters()):
        torch.testing.assert_close(got, 0.9 * x0 + 0.1 * t1, rtol=1e-6, atol=1e-6)


def test_exclusions_on_the_byol_model():
    """Every bias and norm parameter of the online network, and nothing else, is excluded."""
    model = _model()
    excluded = excluded_from_decay_and_adaptation(model)
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in
               [*model.encoder.modules(), *model.projector.modules(), *model.predictor.modules()])
    # resnet18: 20 BN layers; projector and predictor: one BN and one first-Linear bias each
    assert n_bn == 22
    online = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(excluded & online) == 2 * n_bn + 2
    assert all(n.endswith(("bias", "weight")) for n in excluded)
    assert not any(n.endswith("weight") and ("conv" in n or "net.0" in n or "net.3" in n) for n in excluded)

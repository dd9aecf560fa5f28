"""`KModel`: a UNet with its predictor; `apply_model(x, σ, c_concat, c_crossattn, control, transformer_options)`
scales the input by c_in, maps σ to a timestep, runs the UNet and returns x₀ = x − σ·ε (ε-prediction)."""

import torch


class Predictor(torch.nn.Module):
    """A discrete ᾱ schedule's σᵢ = √((1 − ᾱᵢ)/ᾱᵢ); a σ's timestep is the index of the nearest σᵢ in log space (Forge
    quantises), a timestep's σ interpolates log σ; `get_sigmas(n)` spaces n timesteps evenly from the last to 0."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def calculate_input(self, sigma, x):
        return x / (sigma.view(-1, *([1] * (x.dim() - 1))) ** 2 + 1) ** 0.5

    def timestep(self, sigma):
        return (sigma.log()[None] - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        t = timestep.float().clamp(0, len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def get_sigmas(self, n):
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return torch.cat([self.sigma(t), t.new_zeros(1)])

    def calculate_denoised(self, sigma, output, x):
        return x - output * sigma.view(-1, *([1] * (x.dim() - 1)))


class KModel(torch.nn.Module):
    def __init__(self, model, diffusers_scheduler=None, k_predictor=None, config=None):
        super().__init__()
        self.config = config
        self.storage_dtype = model.storage_dtype
        self.computation_dtype = model.computation_dtype
        self.diffusion_model = model
        self.predictor = k_predictor

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        out = self.diffusion_model(xc.to(self.computation_dtype), self.predictor.timestep(sigma).float(),
                                   context=c_crossattn.to(self.computation_dtype), control=control,
                                   transformer_options=transformer_options, **kwargs).float()
        return self.predictor.calculate_denoised(sigma, out, x)

    def memory_required(self, input_shape):
        return 0

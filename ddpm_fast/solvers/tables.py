"""Per-set_timesteps coefficient tables of the multistep samplers: one row per step index.

Everything a step needs that depends only on the schedule and the step index is computed here once,
on the host in float64, from the sampler's sigmas (diffusers' "sigma" = sqrt((1 - abar) / abar), a
float array [N + 1]: the N steps' sigmas and the final one, 0 for final_sigmas_type "zero"), so a
step is elementwise math over (model_output, sample, history, one table row) -- no host sync, no
host-to-device copy.

Notation (exact for every schedule): alpha = 1 / sqrt(1 + sigma^2), sigma_t = sigma * alpha (flow
sigmas: alpha = 1 - sigma, sigma_t = sigma), lambda = log(alpha) - log(sigma_t); step i goes from
s0 = sigmas[i] to t = sigmas[i + 1], h = lambda_t - lambda_s0; the k-th previous model output was taken
at sigmas[i - k].

Tables (float64 numpy on the host; ``on(device, dtype)`` gives the device tensors, cached):

- DPM-Solver (``dpm_solver_table``): ``coef`` [N, max_order, 7], columns DPM_COLUMNS. The converted
  output m (the x0 prediction for dpmsolver++ / sde-dpmsolver++, epsilon for dpmsolver / sde-dpmsolver)
  is m = conv_sample * sample + conv_model * model_output, then
  x_prev = c_sample * sample + c_m0 * m + c_h1 * m[i-1] + c_h2 * m[i-2] + c_noise * noise
  (order k uses column sets [:, k - 1]; midpoint / heun; the SDE variants' noise term).
- Euler (``euler_table``): ``coef`` [N, 1, 3]: sigma, sigma_next, 1 / sqrt(sigma^2 + 1) (the
  scale_model_input factor); the churn (gamma) depends on step arguments and is applied in the step.
- Euler ancestral (``euler_ancestral_table``): ``coef`` [N, 1, 5]: sigma, sigma_up, sigma_down,
  1 / sqrt(sigma^2 + 1), sigma_next.
- UniPC (``unipc_table``): predictor ``coef`` [N, max_order, 6] (UNIPC_PREDICTOR_COLUMNS): the converted
  output m = conv_sample * sample + conv_model * model_output (x0 for predict_x0, else epsilon),
  x_prev = p_sample * corrected + p_m0 * m + p_h1 * m[i-1] + p_h2 * m[i-2]; corrector ``corrector``
  [N, max_order + 1, 6] (UNIPC_CORRECTOR_COLUMNS; order 0 = no correction): corrected = c_this * sample
  + c_last * last_sample + c_model * m + c_h1 * m[i-1] + c_h2 * m[i-2] + c_h3 * m[i-3]. The UniC / UniP
  rho coefficients are the solutions of diffusers' small linear systems, solved here in float64.

``max_order`` [N] (int64) is the order the row allows (solver_order, lowered at the final steps by
lower_order_final / euler_at_final / final_sigmas_type); a step's order is min(max_order[i], steps_done + 1)
where steps_done counts the steps since the loop began (the warm-up of a multistep method).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

__all__ = ["SolverTable", "dpm_solver_table", "euler_table", "euler_ancestral_table", "unipc_table",
           "FUSED_COLUMNS", "DPM_COLUMNS", "UNIPC_PREDICTOR_COLUMNS", "UNIPC_CORRECTOR_COLUMNS", "EULER_COLUMNS",
           "EULER_ANCESTRAL_COLUMNS"]

DPM_COLUMNS = ("conv_sample", "conv_model", "c_sample", "c_m0", "c_h1", "c_h2", "c_noise")
UNIPC_PREDICTOR_COLUMNS = ("conv_sample", "conv_model", "p_sample", "p_m0", "p_h1", "p_h2")
UNIPC_CORRECTOR_COLUMNS = ("c_this", "c_last", "c_model", "c_h1", "c_h2", "c_h3")
EULER_COLUMNS = ("sigma", "sigma_next", "input_scale")
EULER_ANCESTRAL_COLUMNS = ("sigma", "sigma_up", "sigma_down", "input_scale", "sigma_next")
# The columns of a fused row, the coefficients of ddpm_fast.reference.solver_update (the order its kernels read)
FUSED_COLUMNS = ("churn", "conv_sample", "conv_model", "c_this", "c_last", "c_model", "c_h1", "c_h2", "c_h3",
                 "p_corr", "p_m0", "p_h1", "p_h2", "p_noise")
FUSED = {name: k for k, name in enumerate(FUSED_COLUMNS)}

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
MULTISTEP_PREDICTION_TYPES = PREDICTION_TYPES + ("flow_prediction",)


class SolverTable:
    """The coefficients of one sampler for one set_timesteps: float64 numpy arrays on the host, device
    tensors made on demand (``on``) and cached per (device, dtype).

    kind: "dpm_solver" | "euler" | "euler_ancestral" | "unipc"; coef: float64 [N, orders, columns];
    corrector: float64 [N, orders + 1, 6] (UniPC) or None; max_order: int64 [N]; solver_order: the ring
    buffer length a history needs (0: no history); num_sigmas: N + 1 (Euler's churn divides by N)."""

    def __init__(self, kind: str, coef: np.ndarray, max_order: np.ndarray, solver_order: int,
                 num_sigmas: int, corrector: np.ndarray | None = None, prediction_type: str = "epsilon",
                 sde: bool = False, predict_x0: bool = True):
        self.kind = kind
        self.prediction_type = prediction_type
        self.coef = coef
        self.corrector = corrector
        self.max_order = max_order
        self.solver_order = solver_order
        self.num_sigmas = num_sigmas
        self.sde = sde  # the step adds c_noise * noise (DPM-Solver's SDE variants)
        self.predict_x0 = predict_x0  # the history holds x0 (else epsilon: UniPC predict_x0=False, dpmsolver)
        self._device_tables: dict = {}

    @property
    def num_steps(self) -> int:
        return self.coef.shape[0]

    def on(self, device, dtype=torch.float32) -> dict:
        """{"coef", "corrector" (or None), "max_order"} as tensors on device (coefficients in float32, float64
        for dtype float64), and "coef_columns" / "corrector_columns": [row][order] tuples of 0-dim views.
        The first call per (device, dtype) copies them (set_timesteps time)."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (torch.device(device), dtype)
        tables = self._device_tables.get(key)
        if tables is None:
            tables = self._device_tables[key] = {
                "coef": torch.as_tensor(self.coef, dtype=dtype).to(key[0]),
                "corrector": (None if self.corrector is None
                              else torch.as_tensor(self.corrector, dtype=dtype).to(key[0])),
                "max_order": torch.as_tensor(self.max_order, dtype=torch.int64).to(key[0]),
            }
            for name in ("coef", "corrector"):  # 0-dim views per (row, order): a host-index step takes them
                if tables[name] is not None:
                    tables[name + "_columns"] = [[tuple(at_order.unbind(0)) for at_order in row]
                                                 for row in tables[name]]
        return tables


    # -- the fused rows: one per (step, predictor order, corrector order), the arguments of solver_update ----
    @property
    def corrector_orders(self) -> int:
        """The corrector orders a row can take: solver_order + 1 (UniPC: 0, the identity, to solver_order), else 1."""
        return 1 if self.corrector is None else self.corrector.shape[1]

    def row_of(self, step_index, order=1, corrector_order=0):
        """The fused row of (step index, predictor order >= 1, corrector order): Python ints, or int64 device
        tensors [B] (a few elementwise int ops, no sync)."""
        return (step_index * self.coef.shape[1] + (order - 1)) * self.corrector_orders + corrector_order

    def fused_rows(self, churn: tuple | None = None) -> np.ndarray:
        """float64 [R, 14] (FUSED_COLUMNS), R = num_steps * orders * corrector_orders, row row_of(i, k, c).
        churn: Euler's (s_churn, s_tmin, s_tmax, s_noise) (None: no churn); cached per churn."""
        key = ("rows", churn)
        rows = self._device_tables.get(key)
        if rows is None:
            rows = self._device_tables[key] = _FUSED_BUILDERS[self.kind](self, churn)
        return rows

    def fused(self, device, dtype=torch.float32, churn: tuple | None = None) -> torch.Tensor:
        """fused_rows(churn) on device, float32 (float64 for dtype float64), contiguous; cached per (device,
        dtype, churn): the first call copies (set_timesteps time)."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = ("fused", torch.device(device), dtype, churn)
        rows = self._device_tables.get(key)
        if rows is None:
            rows = self._device_tables[key] = torch.as_tensor(self.fused_rows(churn), dtype=dtype).to(key[1])
        return rows

    def host_rows(self, device, dtype, batch: int, churn: tuple | None = None) -> tuple:
        """For each host step index i, (fused(device, dtype, churn), row_index(row_of(i), batch, device)): the
        arguments of a step at order 1 without corrector (Euler's), cached per (device, dtype, batch, churn), so
        a step finds both with one lookup."""
        key = ("host_rows", device, dtype == torch.float64, batch, churn)
        steps = self._device_tables.get(key)
        if steps is None:
            rows = self.fused(device, dtype, churn)
            steps = self._device_tables[key] = tuple((rows, self.row_index(self.row_of(i), batch, device))
                                                     for i in range(self.num_steps))
        return steps

    def row_index(self, row: int, batch: int, device) -> torch.Tensor:
        """int64 [batch] filled with ``row`` on device: a view of one [R, batch] tensor made at the first call per
        (batch, device) (one copy to the device, at the loop's first step), so a host step index costs no op
        and no host-to-device copy after that."""
        key = ("row_index", batch, device)
        views = self._device_tables.get(key)
        if views is None:
            count = self.num_steps * self.coef.shape[1] * self.corrector_orders
            every_row = torch.arange(count, dtype=torch.int64).repeat_interleave(batch).reshape(count, batch)
            views = self._device_tables[key] = every_row.to(device).unbind(0)
        return views[row]


def _sigmas64(sigmas) -> np.ndarray:
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.detach().cpu().double().numpy()
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas: expected a 1-d array of at least 2 values (N steps + the final), got shape "
                         f"{sigmas.shape}")
    if not np.all(np.isfinite(sigmas)) or np.any(sigmas < 0) or np.any(sigmas[:-1] <= 0):
        raise ValueError("sigmas: expected finite values, positive except the final one (which may be 0)")
    return sigmas


def _alpha_sigma_lambda(sigmas: np.ndarray, flow_sigmas: bool = False):
    """(alpha, sigma_t, lambda) of diffusers' sigmas: alpha = 1/sqrt(1+s^2), sigma_t = s alpha, lambda = -log s
    (flow sigmas: alpha = 1 - s, sigma_t = s)."""
    if flow_sigmas:
        alpha, sigma_t = 1.0 - sigmas, sigmas.copy()
    else:
        alpha = 1.0 / np.sqrt(sigmas * sigmas + 1.0)
        sigma_t = sigmas * alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(alpha) - np.log(sigma_t)  # +inf at a final sigma of 0
    return alpha, sigma_t, lam


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _conversion(prediction_type: str, alpha: float, sigma: float, raw_sigma: float, to_x0: bool):
    """(conv_sample, conv_model): the x0 (to_x0) or epsilon prediction as conv_sample * x + conv_model * out.
    alpha, sigma: the step's alpha_t, sigma_t; raw_sigma: the schedule's sigma (flow_prediction's factor)."""
    if to_x0:
        return {"epsilon": (1.0 / alpha, -sigma / alpha), "sample": (0.0, 1.0),
                "v_prediction": (alpha, -sigma), "flow_prediction": (1.0, -raw_sigma)}[prediction_type]
    if prediction_type == "flow_prediction":
        raise ValueError("prediction_type: 'flow_prediction' needs the data prediction (predict_x0=True)")
    return {"epsilon": (0.0, 1.0), "sample": (1.0 / sigma, -alpha / sigma),
            "v_prediction": (sigma, alpha)}[prediction_type]


def _dpm_step_coefficients(algorithm_type: str, h: float, alpha_s0: float, sigma_s0: float, alpha_t: float,
                           sigma_t: float):
    """(decay, first, second, third, noise) of one DPM-Solver step s0 -> t (h = lambda_t - lambda_s0 > 0):
    x_prev = decay x + first D0 + second D1 + third D2 + noise z, D0 = m0 and D1, D2 the history's
    differences (dpm_solver_table), m the x0 (dpmsolver++ / sde-dpmsolver++) or epsilon prediction
    (dpmsolver / sde-dpmsolver). ``second`` is heun's and order 3's (a midpoint order-2 step takes first / 2);
    ``third`` is None where the variant has no third order (sde-dpmsolver)."""
    if algorithm_type == "dpmsolver++":
        em = math.expm1(-h)
        return (sigma_t / sigma_s0, -alpha_t * em, alpha_t * (em / h + 1.0), -alpha_t * ((em + h) / h ** 2 - 0.5),
                0.0)
    if algorithm_type == "sde-dpmsolver++":  # the SDE's exp(-2h) terms, plus sigma_t sqrt(1 - e^{-2h}) noise
        one_minus = -math.expm1(-2.0 * h)
        return (sigma_t / sigma_s0 * math.exp(-h), alpha_t * one_minus, alpha_t * (one_minus / (-2.0 * h) + 1.0),
                alpha_t * ((one_minus - 2.0 * h) / (2.0 * h) ** 2 - 0.5), sigma_t * math.sqrt(one_minus))
    ep = math.expm1(h)
    if algorithm_type == "dpmsolver":
        return (alpha_t / alpha_s0, -sigma_t * ep, -sigma_t * (ep / h - 1.0), -sigma_t * ((ep - h) / h ** 2 - 0.5),
                0.0)
    # sde-dpmsolver: twice the ODE's drift terms, plus sigma_t sqrt(e^{2h} - 1) noise
    return (alpha_t / alpha_s0, -2.0 * sigma_t * ep, -2.0 * sigma_t * (ep / h - 1.0), None,
            sigma_t * math.sqrt(math.expm1(2.0 * h)))


def dpm_solver_table(sigmas, *, solver_order: int = 2, algorithm_type: str = "dpmsolver++",
                     solver_type: str = "midpoint", prediction_type: str = "epsilon",
                     lower_order_final: bool = True, euler_at_final: bool = False,
                     final_sigmas_type: str = "zero", flow_sigmas: bool = False) -> SolverTable:
    """DPM-Solver multistep (diffusers' DPMSolverMultistepScheduler) coefficients.

    algorithm_type: "dpmsolver++" / "sde-dpmsolver++" (the history holds x0 predictions) or the noise-prediction
    "dpmsolver" / "sde-dpmsolver" (the history holds epsilon: predict_x0=False; diffusers refuses them with
    final_sigmas_type "zero", so does this; "sde-dpmsolver" has no order 3 there, nor here; prediction_type
    "flow_prediction" needs an x0 algorithm). The "sde-" variants add noise (SolverTable.sde).
    sigmas: float [N + 1] (the scheduler's ``sigmas`` after set_timesteps); flow_sigmas: the scheduler's
    use_flow_sigmas (alpha = 1 - sigma, sigma_t = sigma). Returns a SolverTable of kind "dpm_solver",
    coef float64 [N, solver_order, 7] (DPM_COLUMNS). Raises ValueError for a combination diffusers refuses."""
    sig = _sigmas64(sigmas)
    _check_choice("solver_order", solver_order, (1, 2, 3))
    _check_choice("algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"))
    _check_choice("solver_type", solver_type, ("midpoint", "heun"))
    _check_choice("prediction_type", prediction_type, MULTISTEP_PREDICTION_TYPES)
    _check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
    predict_x0 = algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
    if not predict_x0:
        if final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type: algorithm_type {algorithm_type!r} needs 'sigma_min' (as diffusers), "
                             f"got 'zero'")
        if sig[-1] == 0:
            raise ValueError(f"sigmas: algorithm_type {algorithm_type!r} needs a positive final sigma, got 0")
        if prediction_type == "flow_prediction":
            raise ValueError(f"prediction_type: 'flow_prediction' needs algorithm_type 'dpmsolver++' or "
                             f"'sde-dpmsolver++', got {algorithm_type!r}")
        if algorithm_type == "sde-dpmsolver" and solver_order == 3:
            raise ValueError("algorithm_type: 'sde-dpmsolver' has no third order (diffusers' neither): expected "
                             "solver_order 1 or 2")
    alpha, sigma_t, lam = _alpha_sigma_lambda(sig, flow_sigmas)
    n = sig.shape[0] - 1
    coef = np.zeros((n, solver_order, len(DPM_COLUMNS)))
    max_order = np.empty(n, dtype=np.int64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # h = inf at a final sigma of 0
        for i in range(n):
            last = i == n - 1 and (euler_at_final or (lower_order_final and n < 15) or final_sigmas_type == "zero")
            second_last = i == n - 2 and lower_order_final and n < 15
            max_order[i] = 1 if (solver_order == 1 or last) else (2 if (solver_order == 2 or second_last) else 3)
            conv = _conversion(prediction_type, alpha[i], sigma_t[i], sig[i], to_x0=predict_x0)
            h = lam[i + 1] - lam[i]
            decay, first, second, third, noise = _dpm_step_coefficients(algorithm_type, h, alpha[i], sigma_t[i],
                                                                        alpha[i + 1], sigma_t[i + 1])
            for k in range(1, solver_order + 1):
                order = min(k, i + 1)  # rows before the history exists fall back to the order they can take
                c_m = [first, 0.0, 0.0]
                if order == 2:
                    r0 = (lam[i] - lam[i - 1]) / h
                    on_d1 = 0.5 * first if solver_type == "midpoint" else second
                    # D1 = (m0 - m1) / r0
                    c_m = [first + on_d1 / r0, -on_d1 / r0, 0.0]
                elif order == 3:
                    r0 = (lam[i] - lam[i - 1]) / h
                    r1 = (lam[i - 1] - lam[i - 2]) / h
                    # D1 = u0 + r0/(r0+r1) (u0 - u1), D2 = (u0 - u1)/(r0+r1), u0 = (m0-m1)/r0, u1 = (m1-m2)/r1
                    q = r0 / (r0 + r1)
                    on_u0 = second * (1.0 + q) + third / (r0 + r1)
                    on_u1 = -second * q - third / (r0 + r1)
                    c_m = [first + on_u0 / r0, -on_u0 / r0 + on_u1 / r1, -on_u1 / r1]
                coef[i, k - 1] = (conv[0], conv[1], decay, c_m[0], c_m[1], c_m[2], noise)
    return SolverTable("dpm_solver", coef, max_order, solver_order, n + 1, prediction_type=prediction_type,
                       sde=algorithm_type.startswith("sde-"), predict_x0=predict_x0)


def euler_table(sigmas, *, prediction_type: str = "epsilon") -> SolverTable:
    """Euler (diffusers' EulerDiscreteScheduler): coef float64 [N, 1, 3] (EULER_COLUMNS)."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    sig = _sigmas64(sigmas)
    n = sig.shape[0] - 1
    coef = np.stack([sig[:-1], sig[1:], 1.0 / np.sqrt(sig[:-1] ** 2 + 1.0)], axis=1)[:, None, :]
    return SolverTable("euler", coef, np.ones(n, dtype=np.int64), 0, n + 1, prediction_type=prediction_type)


def euler_ancestral_table(sigmas, *, prediction_type: str = "epsilon") -> SolverTable:
    """Euler ancestral (EulerAncestralDiscreteScheduler): sigma_up = sqrt(s_to^2 (s^2 - s_to^2) / s^2),
    sigma_down = sqrt(s_to^2 - sigma_up^2); coef float64 [N, 1, 5] (EULER_ANCESTRAL_COLUMNS).
    prediction_type: "epsilon" or "v_prediction" (diffusers has no "sample" here)."""
    _check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
    sig = _sigmas64(sigmas)
    n = sig.shape[0] - 1
    s_from, s_to = sig[:-1], sig[1:]
    sigma_up = np.sqrt(np.maximum(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2, 0.0))
    sigma_down = np.sqrt(np.maximum(s_to ** 2 - sigma_up ** 2, 0.0))
    coef = np.stack([s_from, sigma_up, sigma_down, 1.0 / np.sqrt(s_from ** 2 + 1.0), s_to], axis=1)[:, None, :]
    return SolverTable("euler_ancestral", coef, np.ones(n, dtype=np.int64), 0, n + 1,
                       prediction_type=prediction_type)


def _unipc_rhos(lam: np.ndarray, s0: int, t: int, order: int, predict_x0: bool, bh1: bool, predictor: bool):
    """(h_phi_1, B(h), rk [order - 1], rho): the UniP (predictor: order - 1 rhos, the system without its last
    row) or UniC (order rhos) coefficients between sigma index s0 and t, history at s0 - 1, s0 - 2, ..."""
    h = lam[t] - lam[s0]
    hh = -h if predict_x0 else h
    h_phi_1 = math.expm1(hh)
    b_h = hh if bh1 else math.expm1(hh)
    rks = [(lam[s0 - j] - lam[s0]) / h for j in range(1, order)] + [1.0]
    rows, rhs = [], []
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    for n in range(1, order + 1):
        rows.append([r ** (n - 1) for r in rks])
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= n + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    system, rhs = np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64)
    if predictor:
        system, rhs = system[:-1, :-1], rhs[:-1]
    if predictor and order == 1:
        rho = np.zeros(0)
    elif order == 1 + predictor:  # diffusers' fixed rho of the lowest order with a history term
        rho = np.array([0.5])
    else:
        try:
            rho = np.linalg.solve(system, rhs)
        except np.linalg.LinAlgError:  # a step to sigma 0 at order > 1 (never taken with lower_order_final)
            rho = np.full(rhs.shape, np.nan)
    return h_phi_1, b_h, np.array(rks[:-1]), rho


def unipc_table(sigmas, *, solver_order: int = 2, solver_type: str = "bh2", predict_x0: bool = True,
                prediction_type: str = "epsilon", lower_order_final: bool = True,
                disable_corrector: Iterable[int] = (), flow_sigmas: bool = False) -> SolverTable:
    """UniPC multistep (UniPCMultistepScheduler): predictor coef float64 [N, solver_order, 6], corrector
    float64 [N, solver_order + 1, 6]; rows whose corrector is disabled (step index - 1 in
    disable_corrector, or step 0) hold the identity at every order. flow_sigmas: as dpm_solver_table's."""
    sig = _sigmas64(sigmas)
    _check_choice("solver_order", solver_order, (1, 2, 3))
    _check_choice("solver_type", solver_type, ("bh1", "bh2"))
    _check_choice("prediction_type", prediction_type, MULTISTEP_PREDICTION_TYPES)
    disabled = {int(i) for i in disable_corrector}
    alpha, sigma_t, lam = _alpha_sigma_lambda(sig, flow_sigmas)
    n = sig.shape[0] - 1
    bh1 = solver_type == "bh1"
    scale = alpha if predict_x0 else sigma_t  # the factor of h_phi_1 and B(h): alpha_t (x0) or sigma_t (eps)
    ratio = (sigma_t[1:] / sigma_t[:-1]) if predict_x0 else (alpha[1:] / alpha[:-1])
    coef = np.zeros((n, solver_order, len(UNIPC_PREDICTOR_COLUMNS)))
    corrector = np.zeros((n, solver_order + 1, len(UNIPC_CORRECTOR_COLUMNS)))
    corrector[:, :, 0] = 1.0  # identity: the sample as it came
    max_order = np.array([min(solver_order, n - i) if lower_order_final else solver_order for i in range(n)],
                         dtype=np.int64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for i in range(n):
            conv = _conversion(prediction_type, alpha[i], sigma_t[i], sig[i], to_x0=predict_x0)
            for k in range(1, solver_order + 1):
                order = min(k, i + 1)
                h_phi_1, b_h, rks, rho = _unipc_rhos(lam, i, i + 1, order, predict_x0, bh1, predictor=True)
                on_history = [-scale[i + 1] * b_h * r / rk for r, rk in zip(rho, rks)]
                p_m0 = -scale[i + 1] * h_phi_1 - sum(on_history)
                coef[i, k - 1] = (conv[0], conv[1], ratio[i], p_m0, *(on_history + [0.0, 0.0])[:2])
            if i == 0 or (i - 1) in disabled:
                continue
            for k in range(1, solver_order + 1):
                order = min(k, i)
                h_phi_1, b_h, rks, rho = _unipc_rhos(lam, i - 1, i, order, predict_x0, bh1, predictor=False)
                on_history = [-scale[i] * b_h * r / rk for r, rk in zip(rho[:-1], rks)]
                c_model = -scale[i] * b_h * rho[-1]
                c_h1 = -scale[i] * h_phi_1 - sum(on_history) - c_model
                corrector[i, k] = (0.0, ratio[i - 1], c_model, c_h1, *(on_history + [0.0, 0.0])[:2])
    return SolverTable("unipc", coef, max_order, solver_order, n + 1, corrector=corrector,
                       prediction_type=prediction_type, predict_x0=predict_x0)


# -- the fused rows of each kind (SolverTable.fused_rows) ---------------------------------------------
def _rows_dpm_solver(table: SolverTable, churn) -> np.ndarray:
    """m = conv_sample x + conv_model out (x0 or epsilon); x_prev = c_sample x + c_m0 m + c_h1 m[i-1] + c_h2 m[i-2]
    + c_noise noise: corrected = x, p_corr = c_sample."""
    n, orders, _ = table.coef.shape
    rows = np.zeros((n, orders, len(FUSED_COLUMNS)))
    conv_sample, conv_model, c_sample, c_m0, c_h1, c_h2, c_noise = np.moveaxis(table.coef, 2, 0)
    rows[..., FUSED["conv_sample"]], rows[..., FUSED["conv_model"]] = conv_sample, conv_model
    rows[..., FUSED["c_this"]] = 1.0
    for name, value in (("p_corr", c_sample), ("p_m0", c_m0), ("p_h1", c_h1), ("p_h2", c_h2), ("p_noise", c_noise)):
        rows[..., FUSED[name]] = value
    return rows.reshape(-1, len(FUSED_COLUMNS))


def _rows_unipc(table: SolverTable, churn) -> np.ndarray:
    """Row (i, k, c): the predictor of order k after the corrector of order c (UNIPC_*_COLUMNS in the fused
    ones' order)."""
    n, orders, _ = table.coef.shape
    rows = np.zeros((n, orders, table.corrector_orders, len(FUSED_COLUMNS)))
    rows[..., FUSED["conv_sample"]:FUSED["conv_model"] + 1] = table.coef[:, :, None, 0:2]
    rows[..., FUSED["c_this"]:FUSED["c_h3"] + 1] = table.corrector[:, None, :, :]
    rows[..., FUSED["p_corr"]:FUSED["p_h2"] + 1] = table.coef[:, :, None, 2:6]
    return rows.reshape(-1, len(FUSED_COLUMNS))


def _euler_conversion(prediction_type, sigma, sigma_hat, input_scale):
    """(conv_sample, conv_model) of Euler's x0: x - sigma_hat eps | x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1)
    | out (diffusers' formulas, at the churned sample)."""
    if prediction_type == "epsilon":
        return np.ones_like(sigma), -sigma_hat
    if prediction_type == "v_prediction":
        return input_scale * input_scale, -sigma * input_scale
    return np.zeros_like(sigma), np.ones_like(sigma)


def _euler_rows(sigma, sigma_hat, sigma_to, input_scale, prediction_type, churn=None, noise=None):
    """x_prev = x + (x - x0) / sigma_hat (sigma_to - sigma_hat) = (1 + d) x - d x0, d = (sigma_to - sigma_hat)
    / sigma_hat, at x = the churned sample."""
    rows = np.zeros((sigma.shape[0], len(FUSED_COLUMNS)))
    conv_sample, conv_model = _euler_conversion(prediction_type, sigma, sigma_hat, input_scale)
    step = (sigma_to - sigma_hat) / sigma_hat
    for name, value in (("conv_sample", conv_sample), ("conv_model", conv_model), ("c_this", 1.0),
                        ("p_corr", 1.0 + step), ("p_m0", -step)):
        rows[:, FUSED[name]] = value
    if churn is not None:
        rows[:, FUSED["churn"]] = churn
    if noise is not None:
        rows[:, FUSED["p_noise"]] = noise
    return rows


def _rows_euler(table: SolverTable, churn) -> np.ndarray:
    """Karras et al.'s churn: gamma = min(s_churn / N, sqrt(2) - 1) where s_tmin <= sigma <= s_tmax, sigma_hat =
    sigma (1 + gamma), x <- x + s_noise sqrt(sigma_hat^2 - sigma^2) noise (no churn where gamma = 0)."""
    sigma, sigma_next, input_scale = np.moveaxis(table.coef[:, 0, :], 1, 0)
    s_churn, s_tmin, s_tmax, s_noise = churn if churn is not None else (0.0, 0.0, float("inf"), 1.0)
    max_gamma = min(s_churn / (table.num_sigmas - 1), 2 ** 0.5 - 1)
    gamma = np.where((sigma >= s_tmin) & (sigma <= s_tmax), max_gamma, 0.0) if max_gamma > 0 else np.zeros_like(sigma)
    sigma_hat = sigma * (gamma + 1.0)
    with np.errstate(invalid="ignore"):
        noise_scale = np.where(gamma > 0, s_noise * np.sqrt(sigma_hat * sigma_hat - sigma * sigma), 0.0)
    return _euler_rows(sigma, sigma_hat, sigma_next, input_scale, table.prediction_type, churn=noise_scale)


def _rows_euler_ancestral(table: SolverTable, churn) -> np.ndarray:
    """Euler to sigma_down, then sigma_up noise."""
    sigma, sigma_up, sigma_down, input_scale, _ = np.moveaxis(table.coef[:, 0, :], 1, 0)
    return _euler_rows(sigma, sigma, sigma_down, input_scale, table.prediction_type, noise=sigma_up)


_FUSED_BUILDERS = {"dpm_solver": _rows_dpm_solver, "unipc": _rows_unipc, "euler": _rows_euler,
                   "euler_ancestral": _rows_euler_ancestral}

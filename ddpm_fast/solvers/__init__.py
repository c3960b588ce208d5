"""Multistep samplers as device-resident, sync-free steps: DPM-Solver++, Euler, Euler ancestral, UniPC.

    table = dpm_solver_table(scheduler.sigmas, solver_order=2)      # once per set_timesteps (host, float64)
    history = new_history(table, x)                                 # [solver_order, B, ...] ring buffer
    for i in range(table.num_steps):
        x = dpm_solver_step(model(x, t[i]), x, i, table, history)   # no host sync, no copy to the device

tables.py builds the per-step coefficient tables; steps.py holds the functional steps (the reference
formulas fused kernels must match) and cfg_combine. ddpm_fast.compat.diffusers_solvers wraps them as
drop-in diffusers schedulers.
"""
from .steps import cfg_combine, dpm_solver_step, euler_ancestral_step, euler_step, new_history, unipc_step
from .tables import SolverTable, dpm_solver_table, euler_ancestral_table, euler_table, unipc_table

__all__ = ["SolverTable", "dpm_solver_table", "euler_table", "euler_ancestral_table", "unipc_table",
           "cfg_combine", "new_history", "dpm_solver_step", "euler_step", "euler_ancestral_step", "unipc_step"]

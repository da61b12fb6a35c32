"""Small numpy PDE solvers for the built-in MPP data (`foundation synth mpp`).

Each solver integrates a batch of trajectories at once (arrays are (N, X, Y), axis 0 = x,
axis 1 = y) and returns a `Simulation` that `encoders.mpp.well` writes in The Well's schema.
PDE parameters are drawn per trajectory from the generator passed in, so one seed fixes
everything. The solvers aim for "physically plausible and cheap" (seconds per system at
32²–64²), not for reference accuracy:

- `navier_stokes`: 2-D incompressible Navier–Stokes in vorticity form, pseudo-spectral with
  2/3 de-aliasing and an integrating factor for viscosity, Kolmogorov forcing; saves velocity
  and a passive tracer. Periodic.
- `burgers`: 2-D viscous Burgers (velocity), pseudo-spectral. Periodic.
- `diffusion_reaction`: FitzHugh–Nagumo activator/inhibitor, as PDEBench's 2-D diffusion–
  reaction set; finite differences with no-flux (Neumann) walls.
- `shallow_water`: radial dam break, first-order Rusanov finite volumes with reflecting walls
  (h, u, v), as PDEBench's 2-D shallow-water set.
- `gray_scott`: Gray–Scott reaction–diffusion (fields A, B as in The Well). Periodic.
- `compressible_ns_m1`, `compressible_ns_m01`: compressible Navier–Stokes (density, pressure,
  velocity) at Mach 1 and 0.1, as PDEBench's 2-D CFD sets that MPP pretrains on; second-order
  finite volumes (MUSCL, minmod, Rusanov fluxes, Heun steps) with central viscous stresses,
  conserving mass, momentum and energy. Periodic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Array = np.ndarray


@dataclass
class Simulation:
    """A batch of trajectories of one system, in memory, ready to be written as a Well file."""

    name: str
    t0_fields: dict[str, Array]
    """Scalar fields, name -> (N, T, X, Y) float32."""
    t1_fields: dict[str, Array]
    """Vector fields, name -> (N, T, X, Y, 2) float32 (components in x, y order)."""
    time: Array
    """(T,) float32 simulation times of the saved frames."""
    x: Array
    y: Array
    boundary: dict[str, str]
    """Axis name -> Well bc_type: "PERIODIC", "WALL" or "OPEN"."""
    parameters: dict[str, Array] = field(default_factory=dict)
    """PDE parameter name -> (N,) float32, one value per trajectory."""


def _check_sizes(n_traj: int, resolution: int, n_steps: int) -> None:
    if n_traj < 1 or resolution < 8 or n_steps < 2:
        raise ValueError(
            f"need >= 1 trajectory, resolution >= 8 and >= 2 steps; got {n_traj}, {resolution}, {n_steps}"
        )


def _wavenumbers(n: int, length: float) -> tuple[Array, Array]:
    """Angular wavenumbers for an rfft2 over (x, y) on a periodic square of side `length`."""
    kx = 2 * np.pi * np.fft.fftfreq(n, d=length / n)
    ky = 2 * np.pi * np.fft.rfftfreq(n, d=length / n)
    return kx[:, None], ky[None, :]


def _random_smooth(rng: np.random.Generator, n_traj: int, n: int, peak: float, width: float) -> Array:
    """Zero-mean, unit-std Gaussian random fields with a spectrum peaked at wavenumber `peak`
    (in units of the box's fundamental), periodic."""
    kx = np.fft.fftfreq(n, d=1.0 / n)[:, None]
    ky = np.fft.rfftfreq(n, d=1.0 / n)[None, :]
    k = np.sqrt(kx**2 + ky**2)
    amplitude = np.exp(-0.5 * ((k - peak) / width) ** 2)
    amplitude[0, 0] = 0.0
    noise = rng.standard_normal((n_traj, n, n // 2 + 1)) + 1j * rng.standard_normal((n_traj, n, n // 2 + 1))
    out = np.fft.irfft2(noise * amplitude, s=(n, n))
    out -= out.mean(axis=(1, 2), keepdims=True)
    return out / (out.std(axis=(1, 2), keepdims=True) + 1e-12)


def _cell_centres(n: int, lo: float, hi: float) -> Array:
    dx = (hi - lo) / n
    return (lo + dx * (np.arange(n) + 0.5)).astype(np.float32)


def _laplacian_periodic(a: Array, dx: float) -> Array:
    return (
        np.roll(a, 1, axis=-2)
        + np.roll(a, -1, axis=-2)
        + np.roll(a, 1, axis=-1)
        + np.roll(a, -1, axis=-1)
        - 4 * a
    ) / dx**2


def _laplacian_neumann(a: Array, dx: float) -> Array:
    """5-point Laplacian with zero-flux walls (ghost cells mirror the edge cells)."""
    p = np.pad(a, ((0, 0), (1, 1), (1, 1)), mode="edge")
    return (p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4 * a) / dx**2


# ----------------------------------------------------------------------------- spectral flows


def navier_stokes(rng: np.random.Generator, n_traj: int, resolution: int, n_steps: int) -> Simulation:
    """Incompressible NS in vorticity form on [0,1)², velocity + passive tracer saved."""
    _check_sizes(n_traj, resolution, n_steps)
    n, length = resolution, 1.0
    viscosity = np.exp(rng.uniform(np.log(1e-3), np.log(5e-3), n_traj))
    forcing_amp = rng.uniform(0.5, 2.0, n_traj)
    kx, ky = _wavenumbers(n, length)
    k2 = kx**2 + ky**2
    k2_inv = np.where(k2 > 0, 1.0 / np.where(k2 > 0, k2, 1.0), 0.0)
    dealias = (np.abs(kx) < (2 / 3) * np.abs(kx).max()) & (np.abs(ky) < (2 / 3) * np.abs(ky).max())
    coords = _cell_centres(n, 0.0, length)
    yy = np.broadcast_to(coords[None, :], (n, n))
    forcing = forcing_amp[:, None, None] * np.sin(4 * np.pi * yy)[None] * 2.0
    forcing_hat = np.fft.rfft2(forcing)

    omega = 10.0 * _random_smooth(rng, n_traj, n, peak=4.0, width=1.5)
    tracer = _random_smooth(rng, n_traj, n, peak=2.0, width=1.0)
    w_hat, c_hat = np.fft.rfft2(omega), np.fft.rfft2(tracer)
    nu = viscosity[:, None, None]

    def velocity(w_h: Array) -> tuple[Array, Array]:
        psi_h = w_h * k2_inv
        return np.fft.irfft2(1j * ky * psi_h, s=(n, n)), np.fft.irfft2(-1j * kx * psi_h, s=(n, n))

    def rhs(w_h: Array, c_h: Array) -> tuple[Array, Array]:
        u, v = velocity(w_h)
        adv_w = u * np.fft.irfft2(1j * kx * w_h, s=(n, n)) + v * np.fft.irfft2(1j * ky * w_h, s=(n, n))
        adv_c = u * np.fft.irfft2(1j * kx * c_h, s=(n, n)) + v * np.fft.irfft2(1j * ky * c_h, s=(n, n))
        return (-np.fft.rfft2(adv_w) + forcing_hat) * dealias, -np.fft.rfft2(adv_c) * dealias

    frame_dt = 0.05
    frames_u, frames_c = [], []
    for _ in range(n_steps):
        u, v = velocity(w_hat)
        frames_u.append(np.stack([u, v], axis=-1))
        frames_c.append(np.fft.irfft2(c_hat, s=(n, n)))
        t = 0.0
        while t < frame_dt - 1e-9:
            umax = max(float(np.abs(u).max()), float(np.abs(v).max()), 1e-3)
            dt = min(frame_dt - t, 0.4 * (length / n) / umax)
            decay = np.exp(-nu * k2 * dt)  # integrating factor: viscosity/diffusion exactly
            a_w, a_c = rhs(w_hat, c_hat)
            w1, c1 = decay * (w_hat + dt * a_w), decay * (c_hat + dt * a_c)
            b_w, b_c = rhs(w1, c1)
            w_hat = decay * w_hat + 0.5 * dt * (decay * a_w + b_w)
            c_hat = decay * c_hat + 0.5 * dt * (decay * a_c + b_c)
            t += dt
            u, v = velocity(w_hat)
    return Simulation(
        name="navier_stokes",
        t0_fields={"tracer": np.stack(frames_c, 1).astype(np.float32)},
        t1_fields={"velocity": np.stack(frames_u, 1).astype(np.float32)},
        time=(frame_dt * np.arange(n_steps)).astype(np.float32),
        x=coords,
        y=coords,
        boundary={"x": "PERIODIC", "y": "PERIODIC"},
        parameters={"viscosity": viscosity.astype(np.float32), "forcing": forcing_amp.astype(np.float32)},
    )


def burgers(rng: np.random.Generator, n_traj: int, resolution: int, n_steps: int) -> Simulation:
    """2-D viscous Burgers u_t + (u·∇)u = ν∇²u on [0,1)², periodic."""
    _check_sizes(n_traj, resolution, n_steps)
    n, length = resolution, 1.0
    viscosity = np.exp(rng.uniform(np.log(8e-3), np.log(3e-2), n_traj))
    kx, ky = _wavenumbers(n, length)
    k2 = kx**2 + ky**2
    dealias = (np.abs(kx) < (2 / 3) * np.abs(kx).max()) & (np.abs(ky) < (2 / 3) * np.abs(ky).max())
    amp = rng.uniform(0.5, 1.0, n_traj)[:, None, None]
    u = amp * _random_smooth(rng, n_traj, n, peak=2.0, width=1.0)
    v = amp * _random_smooth(rng, n_traj, n, peak=2.0, width=1.0)
    u_hat, v_hat = np.fft.rfft2(u), np.fft.rfft2(v)
    nu = viscosity[:, None, None]

    def rhs(uh: Array, vh: Array) -> tuple[Array, Array]:
        uu, vv = np.fft.irfft2(uh, s=(n, n)), np.fft.irfft2(vh, s=(n, n))

        def adv(fh: Array) -> Array:
            return uu * np.fft.irfft2(1j * kx * fh, s=(n, n)) + vv * np.fft.irfft2(1j * ky * fh, s=(n, n))

        return -np.fft.rfft2(adv(uh)) * dealias, -np.fft.rfft2(adv(vh)) * dealias

    frame_dt = 0.02
    frames = []
    for _ in range(n_steps):
        uu, vv = np.fft.irfft2(u_hat, s=(n, n)), np.fft.irfft2(v_hat, s=(n, n))
        frames.append(np.stack([uu, vv], axis=-1))
        t = 0.0
        while t < frame_dt - 1e-9:
            umax = max(float(np.abs(uu).max()), float(np.abs(vv).max()), 1e-3)
            dt = min(frame_dt - t, 0.3 * (length / n) / umax)
            decay = np.exp(-nu * k2 * dt)
            a_u, a_v = rhs(u_hat, v_hat)
            u1, v1 = decay * (u_hat + dt * a_u), decay * (v_hat + dt * a_v)
            b_u, b_v = rhs(u1, v1)
            u_hat = decay * u_hat + 0.5 * dt * (decay * a_u + b_u)
            v_hat = decay * v_hat + 0.5 * dt * (decay * a_v + b_v)
            t += dt
            uu, vv = np.fft.irfft2(u_hat, s=(n, n)), np.fft.irfft2(v_hat, s=(n, n))
    coords = _cell_centres(n, 0.0, length)
    return Simulation(
        name="burgers",
        t0_fields={},
        t1_fields={"velocity": np.stack(frames, 1).astype(np.float32)},
        time=(frame_dt * np.arange(n_steps)).astype(np.float32),
        x=coords,
        y=coords,
        boundary={"x": "PERIODIC", "y": "PERIODIC"},
        parameters={"viscosity": viscosity.astype(np.float32)},
    )


# ----------------------------------------------------------------------------- reaction-diffusion


def diffusion_reaction(rng: np.random.Generator, n_traj: int, resolution: int, n_steps: int) -> Simulation:
    """FitzHugh–Nagumo: u_t = Du∇²u + u − u³ − k − v, v_t = Dv∇²v + u − v on [-1,1]², no-flux walls."""
    _check_sizes(n_traj, resolution, n_steps)
    n = resolution
    dx = 2.0 / n
    du = rng.uniform(5e-4, 2e-3, n_traj)[:, None, None]
    dv = rng.uniform(3e-3, 8e-3, n_traj)[:, None, None]
    k = rng.uniform(0.0, 1e-2, n_traj)[:, None, None]
    u = _random_smooth(rng, n_traj, n, peak=6.0, width=3.0)
    v = _random_smooth(rng, n_traj, n, peak=6.0, width=3.0)
    frame_dt = 0.1
    dt = min(0.01, 0.2 * dx**2 / float(dv.max()))
    substeps = int(np.ceil(frame_dt / dt))
    dt = frame_dt / substeps
    frames_u, frames_v = [], []
    for _ in range(n_steps):
        frames_u.append(u.copy())
        frames_v.append(v.copy())
        for _ in range(substeps):
            u, v = (
                u + dt * (du * _laplacian_neumann(u, dx) + u - u**3 - k - v),
                v + dt * (dv * _laplacian_neumann(v, dx) + u - v),
            )
    coords = _cell_centres(n, -1.0, 1.0)
    return Simulation(
        name="diffusion_reaction",
        t0_fields={
            "activator": np.stack(frames_u, 1).astype(np.float32),
            "inhibitor": np.stack(frames_v, 1).astype(np.float32),
        },
        t1_fields={},
        time=(frame_dt * np.arange(n_steps)).astype(np.float32),
        x=coords,
        y=coords,
        boundary={"x": "WALL", "y": "WALL"},
        parameters={
            "Du": du.ravel().astype(np.float32),
            "Dv": dv.ravel().astype(np.float32),
            "k": k.ravel().astype(np.float32),
        },
    )


def gray_scott(rng: np.random.Generator, n_traj: int, resolution: int, n_steps: int) -> Simulation:
    """Gray–Scott: A_t = Da∇²A − AB² + f(1−A), B_t = Db∇²B + AB² − (f+k)B, periodic, grid units."""
    _check_sizes(n_traj, resolution, n_steps)
    n = resolution
    f = rng.uniform(0.025, 0.055, n_traj)[:, None, None]
    kill = rng.uniform(0.056, 0.064, n_traj)[:, None, None]
    da, db = 0.2, 0.1
    a = np.ones((n_traj, n, n))
    b = np.zeros((n_traj, n, n))
    # Seed a few random squares of B, as in Pearson's experiments.
    for i in range(n_traj):
        for _ in range(int(rng.integers(2, 6))):
            cx, cy = rng.integers(0, n, 2)
            half = max(2, n // 16)
            xs = np.arange(cx - half, cx + half) % n
            ys = np.arange(cy - half, cy + half) % n
            a[i][np.ix_(xs, ys)] = 0.5
            b[i][np.ix_(xs, ys)] = 0.25
    b += 0.02 * rng.random((n_traj, n, n))
    iterations_per_frame = 40
    frames_a, frames_b = [], []
    for _ in range(n_steps):
        frames_a.append(a.copy())
        frames_b.append(b.copy())
        for _ in range(iterations_per_frame):
            reaction = a * b * b
            a, b = (
                a + da * _laplacian_periodic(a, 1.0) - reaction + f * (1 - a),
                b + db * _laplacian_periodic(b, 1.0) + reaction - (f + kill) * b,
            )
    coords = _cell_centres(n, -1.0, 1.0)
    return Simulation(
        name="gray_scott",
        t0_fields={
            "A": np.stack(frames_a, 1).astype(np.float32),
            "B": np.stack(frames_b, 1).astype(np.float32),
        },
        t1_fields={},
        time=(float(iterations_per_frame) * np.arange(n_steps)).astype(np.float32),
        x=coords,
        y=coords,
        boundary={"x": "PERIODIC", "y": "PERIODIC"},
        parameters={"F": f.ravel().astype(np.float32), "k": kill.ravel().astype(np.float32)},
    )


# ----------------------------------------------------------------------------- shallow water


def _swe_flux(h: Array, hu: Array, hv: Array, g: float, axis: int) -> tuple[Array, Array, Array]:
    u, v = hu / h, hv / h
    if axis == 0:
        return hu, hu * u + 0.5 * g * h * h, hu * v
    return hv, hv * u, hv * v + 0.5 * g * h * h


def shallow_water(rng: np.random.Generator, n_traj: int, resolution: int, n_steps: int) -> Simulation:
    """Radial dam break on [-2.5,2.5]², Rusanov finite volumes, reflecting walls, g = 1."""
    _check_sizes(n_traj, resolution, n_steps)
    n, g = resolution, 1.0
    dx = 5.0 / n
    coords = _cell_centres(n, -2.5, 2.5)
    xx, yy = np.meshgrid(coords, coords, indexing="ij")
    radius = rng.uniform(0.4, 0.9, n_traj)
    h_in = rng.uniform(1.5, 2.5, n_traj)
    cx, cy = rng.uniform(-1.0, 1.0, n_traj), rng.uniform(-1.0, 1.0, n_traj)
    dist = np.sqrt((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2)
    h = np.where(dist < radius[:, None, None], h_in[:, None, None], 1.0)
    hu = np.zeros_like(h)
    hv = np.zeros_like(h)
    frame_dt = 0.05

    def step(h: Array, hu: Array, hv: Array, dt: float) -> tuple[Array, Array, Array]:
        # Ghost cells: mirror h, negate the wall-normal momentum.
        hp = np.pad(h, ((0, 0), (1, 1), (1, 1)), mode="edge")
        hup = np.pad(hu, ((0, 0), (1, 1), (1, 1)), mode="edge")
        hvp = np.pad(hv, ((0, 0), (1, 1), (1, 1)), mode="edge")
        hup[:, 0, :], hup[:, -1, :] = -hup[:, 1, :], -hup[:, -2, :]
        hvp[:, :, 0], hvp[:, :, -1] = -hvp[:, :, 1], -hvp[:, :, -2]
        updates = [np.zeros_like(h) for _ in range(3)]
        for axis in (0, 1):
            lo = [slice(None), slice(1, -1), slice(1, -1)]
            lo[axis + 1] = slice(0, -1)
            hi = [slice(None), slice(1, -1), slice(1, -1)]
            hi[axis + 1] = slice(1, None)
            left = (hp[tuple(lo)], hup[tuple(lo)], hvp[tuple(lo)])
            right = (hp[tuple(hi)], hup[tuple(hi)], hvp[tuple(hi)])
            fl, fr = _swe_flux(*left, g, axis), _swe_flux(*right, g, axis)
            normal = 1 if axis == 0 else 2
            speed = np.maximum(
                np.abs(left[normal] / left[0]) + np.sqrt(g * left[0]),
                np.abs(right[normal] / right[0]) + np.sqrt(g * right[0]),
            )
            for q in range(3):
                flux = 0.5 * (fl[q] + fr[q]) - 0.5 * speed * (right[q] - left[q])
                diff = np.diff(flux, axis=axis + 1)
                updates[q] -= diff / dx
        return h + dt * updates[0], hu + dt * updates[1], hv + dt * updates[2]

    frames_h, frames_u = [], []
    for _ in range(n_steps):
        frames_h.append(h.copy())
        frames_u.append(np.stack([hu / h, hv / h], axis=-1))
        t = 0.0
        while t < frame_dt - 1e-9:
            speed = float((np.sqrt(hu**2 + hv**2) / h + np.sqrt(g * h)).max())
            dt = min(frame_dt - t, 0.4 * dx / speed)
            h, hu, hv = step(h, hu, hv, dt)
            t += dt
    return Simulation(
        name="shallow_water",
        t0_fields={"height": np.stack(frames_h, 1).astype(np.float32)},
        t1_fields={"velocity": np.stack(frames_u, 1).astype(np.float32)},
        time=(frame_dt * np.arange(n_steps)).astype(np.float32),
        x=coords,
        y=coords,
        boundary={"x": "WALL", "y": "WALL"},
        parameters={
            "dam_radius": radius.astype(np.float32),
            "dam_height": h_in.astype(np.float32),
            "gravity": np.full(n_traj, g, dtype=np.float32),
        },
    )


# ----------------------------------------------------------------------------- compressible flow

GAMMA = 5.0 / 3.0


def _minmod_slope(q: Array, axis: int) -> Array:
    """Limited slope of each cell along `axis` (periodic): the smaller one-sided difference when
    both have the same sign, else 0 — second order where smooth, no new extrema at shocks."""
    forward = np.roll(q, -1, axis=axis) - q
    backward = q - np.roll(q, 1, axis=axis)
    return np.where(
        forward * backward > 0, np.sign(forward) * np.minimum(np.abs(forward), np.abs(backward)), 0.0
    )


def _euler_flux(rho: Array, u: Array, v: Array, p: Array, axis: int) -> tuple[Array, ...]:
    """Flux of (ρ, ρu, ρv, E) across faces normal to `axis` (1 = x, 2 = y) from primitive states."""
    energy = p / (GAMMA - 1) + 0.5 * rho * (u * u + v * v)
    normal = u if axis == 1 else v
    return (
        rho * normal,
        rho * u * normal + (p if axis == 1 else 0.0),
        rho * v * normal + (p if axis == 2 else 0.0),
        (energy + p) * normal,
    )


def _conserved(rho: Array, u: Array, v: Array, p: Array) -> tuple[Array, ...]:
    return rho, rho * u, rho * v, p / (GAMMA - 1) + 0.5 * rho * (u * u + v * v)


def _primitive(state: tuple[Array, ...]) -> tuple[Array, ...]:
    rho, mx, my, energy = state
    u, v = mx / rho, my / rho
    return rho, u, v, (GAMMA - 1) * (energy - 0.5 * rho * (u * u + v * v))


def _cns_rhs(state: tuple[Array, ...], dx: float, eta: Array, zeta: Array) -> list[Array]:
    """dU/dt of compressible Navier–Stokes on a periodic grid: MUSCL (minmod, primitive
    variables) + Rusanov fluxes for the inviscid part, central differences of the viscous stress
    σ = η(∇v + ∇vᵀ) + (ζ − 2η/3)(∇·v)I and of σ·v for the viscous part — every term is a
    difference of fluxes, so mass, momentum and energy are conserved to round-off."""
    prim = _primitive(state)
    rhs = [np.zeros_like(q) for q in state]
    for axis in (1, 2):
        left = [q + 0.5 * _minmod_slope(q, axis) for q in prim]  # face i+1/2, from cell i
        right = [np.roll(q - 0.5 * _minmod_slope(q, axis), -1, axis=axis) for q in prim]  # from i+1
        f_left, f_right = _euler_flux(*left, axis), _euler_flux(*right, axis)
        speed = np.maximum(
            np.abs(left[axis]) + np.sqrt(GAMMA * left[3] / left[0]),
            np.abs(right[axis]) + np.sqrt(GAMMA * right[3] / right[0]),
        )
        q_left, q_right = _conserved(*left), _conserved(*right)
        for k in range(4):
            flux = 0.5 * (f_left[k] + f_right[k]) - 0.5 * speed * (q_right[k] - q_left[k])
            rhs[k] -= (flux - np.roll(flux, 1, axis=axis)) / dx

    def d(q: Array, axis: int) -> Array:
        return (np.roll(q, -1, axis=axis) - np.roll(q, 1, axis=axis)) / (2 * dx)

    _, u, v, _ = prim
    div = d(u, 1) + d(v, 2)
    s_xx = 2 * eta * d(u, 1) + (zeta - 2 * eta / 3) * div
    s_yy = 2 * eta * d(v, 2) + (zeta - 2 * eta / 3) * div
    s_xy = eta * (d(u, 2) + d(v, 1))
    rhs[1] += d(s_xx, 1) + d(s_xy, 2)
    rhs[2] += d(s_xy, 1) + d(s_yy, 2)
    rhs[3] += d(u * s_xx + v * s_xy, 1) + d(u * s_xy + v * s_yy, 2)
    return rhs


def _compressible_ns(
    rng: np.random.Generator, n_traj: int, resolution: int, n_steps: int, mach: float, name: str
) -> Simulation:
    """Compressible NS on [0,1)², periodic, γ = 5/3, as PDEBench's 2-D CFD "rand" sets: smooth
    random density and pressure around 1 and a random velocity whose rms is `mach` × the mean
    sound speed; shear and bulk viscosity η = ζ drawn per trajectory."""
    _check_sizes(n_traj, resolution, n_steps)
    n = resolution
    dx = 1.0 / n
    viscosity = np.exp(rng.uniform(np.log(2e-3), np.log(1e-2), n_traj))
    eta = viscosity[:, None, None]
    rho = 1.0 + 0.2 * np.tanh(_random_smooth(rng, n_traj, n, peak=2.0, width=1.0))
    p = 1.0 + 0.2 * np.tanh(_random_smooth(rng, n_traj, n, peak=2.0, width=1.0))
    sound = np.sqrt(GAMMA)  # of the mean state ρ = p = 1
    u = _random_smooth(rng, n_traj, n, peak=2.0, width=1.0)
    v = _random_smooth(rng, n_traj, n, peak=2.0, width=1.0)
    scale = mach * sound / np.sqrt(np.mean(u * u + v * v, axis=(1, 2), keepdims=True))
    state = _conserved(rho, u * scale, v * scale, p)
    frame_dt = 0.02
    frames: dict[str, list[Array]] = {"density": [], "pressure": [], "velocity": []}
    for _ in range(n_steps):
        rho, u, v, p = _primitive(state)
        frames["density"].append(rho)
        frames["pressure"].append(p)
        frames["velocity"].append(np.stack([u, v], axis=-1))
        t = 0.0
        while t < frame_dt - 1e-9:
            wave = float((np.maximum(np.abs(u), np.abs(v)) + np.sqrt(GAMMA * p / rho)).max())
            viscous = float((rho / (4 * eta / 3)).min()) * dx * dx
            dt = min(frame_dt - t, 0.3 * dx / wave, 0.2 * viscous)
            k1 = _cns_rhs(state, dx, eta, eta)
            mid = tuple(q + dt * r for q, r in zip(state, k1, strict=True))
            k2 = _cns_rhs(mid, dx, eta, eta)
            state = tuple(q + 0.5 * dt * (a + b) for q, a, b in zip(state, k1, k2, strict=True))  # Heun
            t += dt
            rho, u, v, p = _primitive(state)
        if not (rho.min() > 0 and p.min() > 0):
            raise FloatingPointError(f"{name}: density or pressure went non-positive (resolution {n})")
    coords = _cell_centres(n, 0.0, 1.0)
    return Simulation(
        name=name,
        t0_fields={
            "density": np.stack(frames["density"], 1).astype(np.float32),
            "pressure": np.stack(frames["pressure"], 1).astype(np.float32),
        },
        t1_fields={"velocity": np.stack(frames["velocity"], 1).astype(np.float32)},
        time=(frame_dt * np.arange(n_steps)).astype(np.float32),
        x=coords,
        y=coords,
        boundary={"x": "PERIODIC", "y": "PERIODIC"},
        parameters={
            "mach": np.full(n_traj, mach, dtype=np.float32),
            "shear_viscosity": viscosity.astype(np.float32),
            "bulk_viscosity": viscosity.astype(np.float32),
        },
    )


def compressible_ns_m1(rng: np.random.Generator, n_traj: int, resolution: int, n_steps: int) -> Simulation:
    """Compressible NS at Mach 1 (PDEBench / MPP "CNS M1.0"): shocks form."""
    return _compressible_ns(rng, n_traj, resolution, n_steps, 1.0, "compressible_ns_m1")


def compressible_ns_m01(rng: np.random.Generator, n_traj: int, resolution: int, n_steps: int) -> Simulation:
    """Compressible NS at Mach 0.1 (PDEBench / MPP "CNS M0.1"): nearly incompressible, acoustic."""
    return _compressible_ns(rng, n_traj, resolution, n_steps, 0.1, "compressible_ns_m01")


SYSTEMS: dict[str, Callable[[np.random.Generator, int, int, int], Simulation]] = {
    "navier_stokes": navier_stokes,
    "diffusion_reaction": diffusion_reaction,
    "shallow_water": shallow_water,
    "gray_scott": gray_scott,
    "burgers": burgers,
    "compressible_ns_m1": compressible_ns_m1,
    "compressible_ns_m01": compressible_ns_m01,
}
"""Built-in systems by name; `synth mpp --systems` picks from these."""

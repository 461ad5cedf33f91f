"""Weight oscillations in QAT: tracking, iterative freezing and the dampening loss.

With a straight-through estimator, a latent weight whose optimum lies between
two grid points oscillates around the rounding boundary between them. This
package measures such oscillations per weight (:func:`track_oscillations`,
``tracking.py``), freezes weights that oscillate too often
(:func:`freeze_oscillations`, ``freezing.py``), and provides the regulariser that
dampens them (:func:`dampening_loss`, ``dampening.py``), with the schedules the
paper uses for both (``schedules.py``). The per-weight EMAs are fixed point with
stochastic rounding (``fixed_point_ema.py``).

References:
  Nagel, Fournarakis, Bondarenko, Blankevoort, `Overcoming Oscillations in
  Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.
"""

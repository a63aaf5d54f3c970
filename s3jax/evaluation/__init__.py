"""Evaluation sweeps: checkpoints x attributes x strengths x DDIM steps.

The command line is ``python -m s3jax.evaluate`` (``s3jax/evaluate.py``); this
package is what it runs:

* ``inputs``: the videos of a sweep (``Clip``): given video files or frame
  folders (aligned by ``editing.VideoEditor.encode``) or the held-out split of a
  ``data_prep`` dataset (already aligned records with their cached z_id / z_lnd /
  landmarks, encoded by ``VideoEditor.encode_aligned``).
* ``cells``: one cell (checkpoint, video, DDIM steps, attribute, strength) and its
  metrics (pixel, identity, attribute, locality).
* ``sweep``: planning the cells, running them and resuming a stopped sweep.
* ``report``: CSV / JSON / markdown tables, plots and TensorBoard scalars.

For every (checkpoint, video, steps) one extra cell with attribute ``none`` and
strength 0 is the DDIM reconstruction. Metrics per cell (mean over the video's frames):

* reconstruction (``none`` cells): ``ssim``, ``ms_ssim`` (as many of the 5 standard
  scales as fit the crop: a scale needs >= 11 px, so 64 px crops get 3 scales,
  >= 161 px all 5; the weights used are renormalised to sum to 1 and the count is
  in ``ms_ssim_scales``), ``psnr`` (dB, data range 2 for [-1, 1] images), ``mse``
  (on [-1, 1]), ``lpips`` (AlexNet by default, ``config.lpips``);
* ``tl_id`` / ``tg_id``: STIT's TL-ID / TG-ID of the output crops, each frame pair's
  cosine divided by the same pair's in the input crops, averaged (1 = as consistent
  as the source), with the checkpoint's identity network on crops upscaled to 256 px:
  the dlib 128-d descriptor, or ArcFace (IR-SE50) on the official feature path;
  ``*_raw`` are unnormalised;
* ``id_preservation``: mean per-frame cosine between input and output descriptors;
* ``attr_success`` (edit cells): fraction of output frames that the attribute
  classifier, applied to the *re-encoded* z_id (that identity network on the output
  crop, i.e. exactly the z_id encoder), puts on the side of the edit
  (logit > 0 for strength > 0, < 0 for strength < 0); ``attr_logit_gain`` is the
  mean logit change in the direction of the edit relative to the *reconstruction*
  (so that reconstruction error, which moves the logit too, is not credited to the edit);
* ``locality``: mean |output - input| outside the landmark-hull video mask, in
  [-1, 1] units (0 = nothing changed outside the face);
* ``locality_targets``: mean |output - input| outside the attribute's target regions
  (nearest-landmark cells of each frame, the S3Editor's part table; NaN for attributes
  that target everything), the locality S3Editor claims to improve; ``locality_targets_edit``:
  the same against the reconstruction's crops (the change the edit alone makes);
* methods (``config.editors``): 'plain' edits with the classifier direction, an S3Editor
  workdir with its trained transformations, on the same encodings; S3Editor rows are
  labelled ``<checkpoint>+<name>``;
* ``sec_per_frame``: DDIM decoding wall time per frame (compilation excluded),
  ``sec_per_frame_encode``: inversion per frame (reconstruction cells, when not
  read from the encoding cache).

Outputs in the workdir: ``cells/*.json`` (one per finished cell: the sweep
resumes by skipping them), ``results.csv`` and ``results.json`` (every cell),
``summary.md`` (mean over videos per checkpoint/steps/attribute/strength),
``plots/*_vs_strength.png`` and ``plots/*_vs_steps.png``, TensorBoard scalars in
``tensorboard/`` and ``eval_config.json``.
"""

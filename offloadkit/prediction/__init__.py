"""The planner: Plan -> Prediction (memory per stage, bytes moved, time), and synthesis of policies that fit.

`sizing` builds models on `meta` from config folders (`architectures/` holds the built-in ones),
`schedule` says which models a call runs, `stream_profiles` what a streamed strategy loads per
forward, `activations` the working memory, `replay` replays a plan into a `Prediction`,
`hardware` and `calibrate` describe machines, `synthesis` searches policies by their predictions.
"""

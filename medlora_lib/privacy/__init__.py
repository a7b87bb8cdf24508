"""Privacy beyond "the local adapter stays home" (chapter ``notebooks/08_privacy``):
DP-SGD at each site (:mod:`~medlora_lib.privacy.dp_sgd`) and what the shared state
still leaks (:mod:`~medlora_lib.privacy.leakage`). Site-level DP and SecAgg+ are the
server's: :mod:`medlora_lib.fl.site_dp`, :mod:`medlora_lib.fl.secagg`.
"""

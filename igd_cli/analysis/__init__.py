"""The paper's analyses as library functions (``igd analyze``): the activation shift of Sec. 3
(:mod:`.shift`), the Table 6 ablation (:mod:`.ablation`) and the sensitivity sweeps of Figs. 5-7 and Table 10
(:mod:`.sweep`). Each returns plain results that :mod:`igd_cli.report` renders as tables and plots and
:mod:`igd_cli.run_report` puts on one Markdown page; randomized variants are scored by repeated draws
(:mod:`igd_cli.scoring`)."""

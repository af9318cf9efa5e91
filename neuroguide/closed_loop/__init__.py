"""Guo et al.'s closed loop (sec. 3.1, Figs. 4-5): a simulated brain and the propose / record / refit /
report steps (:mod:`neuroguide.closed_loop.steps`). Kept light: importing the package imports nothing,
so that :mod:`neuroguide.data.synthetic.it` can use :mod:`neuroguide.closed_loop.brain` alone."""

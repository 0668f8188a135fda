"""The jobs, one module each, behind the `vla` command: collect demonstrations, train, evaluate in
the sim, bench the control step and the sim. The library (`vla`, `vla.policies`, `vla.sim`,
`vla.kernels`) never imports from here."""

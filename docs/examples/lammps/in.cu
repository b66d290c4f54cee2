# NVE, then NPT, of fcc Cu with a trained model as the force field:
#   potentials lammps model.pt in.cu --types Cu [--var steps 1000]
# No pair_style or pair_coeff: `potentials lammps` attaches the model as soon as create_box has run.
variable     steps index 1000
units        metal
atom_style   atomic
boundary     p p p
lattice      fcc 3.61
region       box block 0 4 0 4 0 4
create_box   1 box
create_atoms 1 box
mass         1 63.546

velocity     all create 600 4928459 mom yes rot no dist gaussian
timestep     0.001
thermo_style custom step temp pe etotal press vol
thermo       50
dump         traj all custom 100 cu.dump id type x y z fx fy fz

# NVE: total energy conserved
fix          nve all nve
variable     etot equal etotal
run          0
print        "${etot}" file nve_start.txt
run          ${steps}
print        "${etot}" file nve_end.txt
unfix        nve

# NPT at 300 K and 0 bar
fix          npt all npt temp 300 300 0.1 iso 0 0 1.0
run          ${steps}
variable     v equal vol
variable     p equal press
print        "${v} ${p}" file npt_end.txt

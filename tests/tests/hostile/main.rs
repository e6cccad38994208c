//! The hostile-program suite: attack programs run beside victim programs, each test judged by
//! what the victim reports (its secret intact, its state as it left it, that it finished) and
//! by the kernel's verdict on the attacker. One module per class of attack.

mod names;
mod quotas;

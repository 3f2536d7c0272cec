//! gpucell-agent: PID 1 of a gpucell guest.

fn main() {
    eprintln!("gpucell-agent {}", env!("CARGO_PKG_VERSION"));
}

// Rebuild the BPF object when bpf-linker changes (for example after an LLVM upgrade).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

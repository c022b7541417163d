fn main() {
    eprintln!("executorctl: not implemented yet");
    std::process::exit(1);
}

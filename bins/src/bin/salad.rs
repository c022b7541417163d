fn main() {
    eprintln!("salad: not implemented yet");
    std::process::exit(1);
}

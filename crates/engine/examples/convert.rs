//! Writes an MLX model folder from a GGUF file (what `mlx-serving convert`
//! does): `cargo run --release --example convert -- model.gguf out-folder`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (src, out) = match (args.next(), args.next()) {
        (Some(s), Some(o)) => (s, o),
        _ => return Err("usage: convert <model.gguf> <out-folder>".into()),
    };
    let r = mlx_serving_engine::formats::convert::gguf_to_mlx(src.as_ref(), out.as_ref())?;
    eprintln!("{r:?}");
    Ok(())
}

//! Issue 12, part 3: the switcher offers the models of other tools' stores, tagged with
//! their source, and a catalog model found there is offered as local with that source.
//! Its own test binary: it sets the process's environment (HOME, the stores' variables),
//! which no other test here may read at the same time.

mod catalog_common;
use catalog_common::*;
use tokentop::catalog::Catalog;

#[test]
fn the_switcher_lists_store_models_with_their_source() {
    let sb = Sandbox::new();
    let home = sb.path("user");
    let lm = home.join(".lmstudio/models/lmstudio-community/Tiny-GGUF");
    std::fs::create_dir_all(&lm).unwrap();
    let mut other = model_bytes(4321);
    other[..4].copy_from_slice(b"GGUF");
    std::fs::write(lm.join("Tiny-Q4_K_M.gguf"), &other).unwrap();
    // A catalog model's file, in an Ollama store (as Ollama names its blobs).
    let mut bytes = model_bytes(5000);
    bytes[..4].copy_from_slice(b"GGUF");
    let hex = sha256(&bytes);
    let ollama = sb.path("ollama-store");
    std::fs::create_dir_all(ollama.join("blobs")).unwrap();
    std::fs::write(ollama.join(format!("blobs/sha256-{hex}")), &bytes).unwrap();
    let manifest = ollama.join("manifests/registry.ollama.ai/library/m");
    std::fs::create_dir_all(&manifest).unwrap();
    std::fs::write(
        manifest.join("latest"),
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:{}","size":2}},"layers":[{{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{hex}","size":5000}}]}}"#,
            "0".repeat(64)
        ) + "\n",
    )
    .unwrap();
    // Only this test runs in this binary, so nothing reads the environment meanwhile.
    for (k, v) in [
        ("HOME", home.as_os_str()),
        ("OLLAMA_MODELS", ollama.as_os_str()),
        ("TOKENTOP_HOME", sb.path("home").as_os_str()),
        ("HF_HOME", sb.path("hf").as_os_str()),
    ] {
        std::env::set_var(k, v);
    }
    for k in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"] {
        std::env::remove_var(k);
    }
    let cat = Catalog::parse(
        &catalog(
            "m.gguf",
            5000,
            Some(&hex),
            r#"{ kind = "hf", repo = "o/n", files = ["m.gguf"] }"#,
        ),
        "test",
    )
    .unwrap();
    let items = tokentop::app::switch_items(&cat, &[]);
    let m = items
        .iter()
        .find(|i| i.label == "m")
        .expect("catalog model");
    assert!(m.is_local());
    assert_eq!(
        m.path.as_deref(),
        Some(ollama.join(format!("blobs/sha256-{hex}")).as_path())
    );
    assert_eq!(m.tags, ["dense", "ollama"]);
    let tiny = items
        .iter()
        .find(|i| i.label == "lmstudio:lmstudio-community/Tiny-GGUF/Tiny-Q4_K_M.gguf")
        .expect("LM Studio model offered");
    assert_eq!(tiny.tags, ["lmstudio"]);
    assert_eq!(tiny.size, 4321);
    assert!(tiny.is_local());
    // The Ollama blob is offered once, as the catalog model.
    assert_eq!(items.len(), 2, "{items:?}");
}

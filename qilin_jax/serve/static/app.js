// The chat page: one image (shown as the model sees it), a conversation streamed from
// POST /v1/chat/completions. No external scripts: it works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, messages: [], model: null, busy: false };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || resp.statusText;
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

async function checkHealth() {
  try {
    const resp = await fetch("/health");
    const body = await resp.json();
    if (resp.ok) {
      state.model = body.model;
      $("status").textContent = "ready: " + body.model + ", " + body.slots + " slots, context " + body.max_context;
      $("max-tokens").max = body.max_context;
      return;
    }
    $("status").textContent = "server " + body.status + "…";
  } catch (e) {
    $("status").textContent = "server unreachable";
  }
  setTimeout(checkHealth, 2000);
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function loadImage(file) {
  let url = await readAsDataURL(file);
  // Browsers give DICOM files an empty or generic type: name them for the server.
  if (/\.(dcm|dicom)$/i.test(file.name) || !/^data:image\/(png|jpeg)/.test(url)) {
    url = "data:application/dicom;base64," + url.slice(url.indexOf(",") + 1);
  }
  $("image-name").textContent = file.name;
  const resp = await fetch("/v1/preview", { method: "POST", headers: headers(), body: JSON.stringify({ image_url: url }) });
  if (!resp.ok) {
    addMessage("error", "image: " + (await errorText(resp)));
    return;
  }
  const body = await resp.json();
  state.image = url;
  $("preview").src = body.preview;
  $("preview").hidden = false;
  $("preview-caption").textContent = "as the model sees it: " + body.size + "×" + body.size + " (" + body.image_mode + ")";
  resetConversation();
}

function resetConversation() {
  state.messages = [];
  $("conversation").textContent = "";
}

function userMessage(text) {
  if (state.messages.length === 0 && state.image) {
    return { role: "user", content: [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text: text }] };
  }
  return { role: "user", content: text };
}

async function ask(question) {
  const out = addMessage("assistant", "");
  out.dataset.done = "0";
  const messages = state.messages.concat([userMessage(question)]);
  const body = { model: state.model, messages: messages, stream: true,
                 temperature: parseFloat($("temperature").value) || 0 };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;  // else the server's default (serve.max_new_tokens)
  const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!resp.ok) {
    out.className = "msg error";
    out.textContent = await errorText(resp);
    out.dataset.done = "1";
    return;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let answer = "";
  let finished = false;
  while (!finished) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let sep;
    while ((sep = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, sep);
      buffer = buffer.slice(sep + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") { finished = true; break; }
      const chunk = JSON.parse(data);
      if (chunk.error) { out.className = "msg error"; answer += chunk.error.message; }
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) answer += choice.delta.content;
      out.textContent = answer;
      out.scrollIntoView({ block: "end" });
    }
  }
  answer = answer.trim();
  out.textContent = answer;
  state.messages = messages.concat([{ role: "assistant", content: answer }]);
  out.dataset.done = "1";
}

$("image-file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) loadImage(file);
});

$("reset").addEventListener("click", () => {
  state.image = null;
  $("preview").hidden = true;
  $("preview-caption").textContent = "";
  $("image-name").textContent = "no image";
  $("image-file").value = "";
  resetConversation();
});

$("ask-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  addMessage("user", question);
  $("question").value = "";
  try {
    await ask(question);
  } catch (err) {
    addMessage("error", String(err));
  } finally {
    state.busy = false;
    $("send").disabled = false;
    $("question").focus();
  }
});

$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("ask-form").requestSubmit();
  }
});

$("api-key").value = localStorage.getItem("qilin-api-key") || "";
$("api-key").addEventListener("change", () => localStorage.setItem("qilin-api-key", $("api-key").value));
checkHealth();
